"""Protocol primitives, no I/O: CAR and CID, DAG-CBOR records, atproto syntax, signatures,
firehose frames -> typed events, getRepo CARs -> verified record columns, MST proofs."""
