//! Dotted paths: closest-name suggestions for [`Error::UnknownModule`].

use crate::error::Error;

/// How many suggestions an [`Error::UnknownModule`] carries at most.
const MAX_SUGGESTIONS: usize = 3;

/// Levenshtein distance between `a` and `b` (by `char`).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The candidates closest to `name` by edit distance (at most [`MAX_SUGGESTIONS`], nearest
/// first, ties by name); candidates farther than `max(3, len/2)` edits are left out.
pub(crate) fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Vec<String> {
    let limit = (name.chars().count() / 2).max(3);
    let mut scored: Vec<(usize, &str)> = candidates
        .filter(|c| !c.is_empty())
        .map(|c| (edit_distance(name, c), c))
        .filter(|&(d, _)| d <= limit)
        .collect();
    scored.sort();
    scored.dedup();
    scored
        .into_iter()
        .take(MAX_SUGGESTIONS)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// [`Error::UnknownModule`] for `name` among `candidates`: the hint names the closest
/// candidates (`did you mean `a`, `b`?`), or lists the candidates when none is close.
pub(crate) fn unknown<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Error {
    let all: Vec<&str> = candidates.filter(|c| !c.is_empty()).collect();
    let close = closest(name, all.iter().copied());
    let quote = |v: &[&str]| {
        v.iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let hint = if !close.is_empty() {
        let close: Vec<&str> = close.iter().map(String::as_str).collect();
        format!("did you mean {}?", quote(&close))
    } else if all.is_empty() {
        "the module has no submodules".to_string()
    } else {
        const SHOWN: usize = 12;
        let mut s = format!(
            "no module is close; the modules are {}",
            quote(&all[..all.len().min(SHOWN)])
        );
        if all.len() > SHOWN {
            s.push_str(&format!(" (and {} more)", all.len() - SHOWN));
        }
        s
    };
    Error::UnknownModule {
        name: name.to_string(),
        hint,
    }
}

/// [`Error::UnknownModule`] for a child `name` of one container.
pub(crate) fn unknown_child<'a>(name: &str, children: impl Iterator<Item = &'a str>) -> Error {
    unknown(name, children)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("conv1", "cnv1"), 1);
        assert_eq!(edit_distance("layer1.0.conv1", "layer1.0.conv2"), 1);
    }

    #[test]
    fn suggestions() {
        let names = ["conv1", "conv2", "bn1", "relu", "layer1.0.conv1", ""];
        assert_eq!(
            closest("cnv1", names.iter().copied()),
            vec!["conv1".to_string(), "bn1".to_string(), "conv2".to_string()]
        );
        assert!(closest("completely_different", names.iter().copied()).is_empty());
    }
}
