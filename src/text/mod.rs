//! Text as models read it. (The tokenization pipeline — data formats, tokenizing, truncation, chat
//! templates — is in `train` for now; it belongs here, below `train` and `infer`, which both use it.)

pub mod padding;

pub use padding::RightPadded;
