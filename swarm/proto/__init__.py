"""Generated protobuf code (scripts/gen_protos.py); never edited by hand."""
