use super::*;

#[test]
fn a_batch_of_marks_round_trips() {
    let key = crate::dedup::key("h", "e-1");
    let batch = MarkBatchOut {
        at: 42,
        keys: vec![serde_bytes::Bytes::new(&key)],
    };
    let bytes = rmp_serde::to_vec_named(&batch).unwrap();
    let back: MarkBatch = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back.at, 42);
    assert_eq!(back.keys[0].as_slice(), b"h\0e-1");
}
