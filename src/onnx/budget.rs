//! A bound on what decoding an ONNX file allocates, computed from its wire bytes before prost
//! decodes it ([`decoded_size`]). prost allocates a whole message struct for each message on
//! the wire — an empty `NodeProto` is 2 bytes in the file and a few hundred in memory — and 8
//! bytes for each 1-byte packed `int64`, so a small hostile file could otherwise make the
//! decoder allocate gigabytes. The walk follows the schema `build.rs` writes from
//! `proto/onnx.proto` (`$OUT_DIR/onnx_schema.rs`): field numbers, which fields are messages,
//! strings or packed scalars, and the size of each generated type.

/// One message type of the schema.
pub(super) struct Message {
    /// Its full protobuf name (`.onnx.NodeProto`).
    name: &'static str,
    /// `size_of` the prost type.
    size: usize,
    /// Its fields.
    fields: &'static [Field],
}

/// One field of a message.
struct Field {
    number: i32,
    kind: Kind,
    repeated: bool,
}

/// How a field is stored (the scalar kinds carry the size of one decoded element).
#[derive(Clone, Copy)]
enum Kind {
    /// A message (index into `MESSAGES`).
    Message(usize),
    /// A string or bytes: its length on the heap.
    Bytes,
    /// A varint scalar (int32, int64, uint64, bool, enum, ...).
    Varint(usize),
    /// A 4-byte scalar (float, fixed32).
    Fixed32(usize),
    /// An 8-byte scalar (double, fixed64).
    Fixed64(usize),
}

include!(concat!(env!("OUT_DIR"), "/onnx_schema.rs"));

/// prost's recursion limit: messages nested deeper are a decode error there too.
const MAX_DEPTH: u32 = 100;

/// An upper estimate of the bytes prost allocates to decode `bytes` as a `ModelProto`: one
/// struct per message occurrence, each string's and bytes field's length, each repeated
/// scalar element at its decoded size. (Vectors that grow while decoding may reserve up to
/// twice their length.) Errors: the wire bytes are malformed (a truncated varint or length,
/// messages nested deeper than prost's limit).
pub(super) fn decoded_size(bytes: &[u8]) -> Result<u64, String> {
    let mut total = MESSAGES[MODEL_PROTO].size as u64;
    scan(bytes, MODEL_PROTO, 0, &mut total)?;
    Ok(total)
}

fn varint(b: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = *b.get(*pos).ok_or("a truncated varint")?;
        *pos += 1;
        if shift < 64 {
            v |= u64::from(byte & 0x7f) << shift;
        }
        if byte < 0x80 {
            return Ok(v);
        }
    }
    Err("a varint longer than 10 bytes".into())
}

fn add(total: &mut u64, n: u64) {
    *total = total.saturating_add(n);
}

fn take<'a>(b: &'a [u8], pos: &mut usize, len: u64) -> Result<&'a [u8], String> {
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| pos.checked_add(l))
        .filter(|&e| e <= b.len())
        .ok_or("a length beyond the end of its message")?;
    let s = &b[*pos..end];
    *pos = end;
    Ok(s)
}

/// Adds the cost of the fields in `b`, the body of a message of type `msg`, to `total`.
fn scan(b: &[u8], msg: usize, depth: u32, total: &mut u64) -> Result<(), String> {
    let m = &MESSAGES[msg];
    if depth > MAX_DEPTH {
        return Err(format!(
            "messages nested deeper than {MAX_DEPTH} (in {})",
            m.name
        ));
    }
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos)?;
        let number = key >> 3;
        let field = m
            .fields
            .iter()
            .find(|f| u64::try_from(f.number).is_ok_and(|n| n == number));
        let repeated = field.is_some_and(|f| f.repeated);
        match key & 7 {
            0 => {
                varint(b, &mut pos)?;
                if let (true, Some(Kind::Varint(e))) = (repeated, field.map(|f| f.kind)) {
                    add(total, e as u64);
                }
            }
            1 => {
                take(b, &mut pos, 8)?;
                if repeated {
                    add(total, 8);
                }
            }
            5 => {
                take(b, &mut pos, 4)?;
                if repeated {
                    add(total, 4);
                }
            }
            2 => {
                let len = varint(b, &mut pos)?;
                let body = take(b, &mut pos, len)?;
                match field.map(|f| f.kind) {
                    Some(Kind::Message(i)) => {
                        add(total, MESSAGES[i].size as u64);
                        scan(body, i, depth + 1, total)?;
                    }
                    Some(Kind::Bytes) => {
                        let own = if repeated {
                            std::mem::size_of::<Vec<u8>>() as u64
                        } else {
                            0
                        };
                        add(total, len.saturating_add(own));
                    }
                    // Packed scalars: one element per varint (per byte below 0x80).
                    Some(Kind::Varint(e)) => add(
                        total,
                        (body.iter().filter(|&&x| x < 0x80).count() * e) as u64,
                    ),
                    Some(Kind::Fixed32(e)) => add(total, (body.len() / 4 * e) as u64),
                    Some(Kind::Fixed64(e)) => add(total, (body.len() / 8 * e) as u64),
                    // An unknown field: skipped, nothing allocated.
                    None => {}
                }
            }
            3 => skip_group(b, &mut pos, number, depth + 1)?,
            w => return Err(format!("wire type {w} in {} (field {number})", m.name)),
        }
    }
    Ok(())
}

/// Skips a group (deprecated wire types 3 and 4, never in ONNX files; prost skips an unknown
/// one) up to its end tag.
fn skip_group(b: &[u8], pos: &mut usize, number: u64, depth: u32) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("groups nested deeper than {MAX_DEPTH}"));
    }
    loop {
        let key = varint(b, pos)?;
        match key & 7 {
            0 => {
                varint(b, pos)?;
            }
            1 => {
                take(b, pos, 8)?;
            }
            5 => {
                take(b, pos, 4)?;
            }
            2 => {
                let len = varint(b, pos)?;
                take(b, pos, len)?;
            }
            3 => skip_group(b, pos, key >> 3, depth + 1)?,
            4 if key >> 3 == number => return Ok(()),
            w => return Err(format!("wire type {w} inside group {number}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto;
    use prost::Message as _;

    #[test]
    fn every_message_type_is_in_the_schema() {
        let names: Vec<&str> = MESSAGES.iter().map(|m| m.name).collect();
        for n in [
            ".onnx.ModelProto",
            ".onnx.GraphProto",
            ".onnx.NodeProto",
            ".onnx.AttributeProto",
            ".onnx.TensorProto",
            ".onnx.TensorProto.Segment",
            ".onnx.TypeProto.Tensor",
        ] {
            assert!(names.contains(&n), "{n}: {names:?}");
        }
        assert_eq!(MESSAGES[MODEL_PROTO].name, ".onnx.ModelProto");
        assert_eq!(
            MESSAGES[MODEL_PROTO].size,
            std::mem::size_of::<proto::ModelProto>()
        );
    }

    #[test]
    fn estimate_counts_structs_strings_and_packed_scalars() {
        let node = proto::NodeProto {
            name: Some("n".repeat(100)),
            input: vec!["a".into(), "bb".into()],
            ..Default::default()
        };
        let tensor = proto::TensorProto {
            int64_data: vec![1; 1000],
            float_data: vec![0.5; 10],
            ..Default::default()
        };
        let model = proto::ModelProto {
            graph: Some(proto::GraphProto {
                node: vec![node.clone(), node],
                initializer: vec![tensor],
                ..Default::default()
            }),
            ..Default::default()
        };
        let size = |t: &str| {
            MESSAGES
                .iter()
                .find(|m| m.name == t)
                .map(|m| m.size as u64)
                .unwrap()
        };
        let want = size(".onnx.ModelProto")
            + size(".onnx.GraphProto")
            + 2 * (size(".onnx.NodeProto") + 100 + 2 * 24 + 3)
            + size(".onnx.TensorProto")
            + 1000 * 8
            + 10 * 4;
        assert_eq!(decoded_size(&model.encode_to_vec()), Ok(want));
    }

    #[test]
    fn malformed_wire_bytes_are_errors() {
        // A truncated varint, a length past the end, an unterminated group.
        for b in [&[0x08u8, 0x80][..], &[0x3a, 0x05, 0x00], &[0x0b]] {
            assert!(decoded_size(b).is_err(), "{b:?}");
        }
        // Messages nested past prost's limit: GraphProto.node -> NodeProto.attribute ->
        // AttributeProto.g -> GraphProto ...
        let mut g = proto::GraphProto::default();
        for _ in 0..60 {
            g = proto::GraphProto {
                node: vec![proto::NodeProto {
                    attribute: vec![proto::AttributeProto {
                        g: Some(g),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
        }
        let m = proto::ModelProto {
            graph: Some(g),
            ..Default::default()
        };
        let e = decoded_size(&m.encode_to_vec()).unwrap_err();
        assert!(e.contains("nested deeper than 100"), "{e}");
    }
}
