//! Text as models read it: preference data in TRL's formats ([`data`], read row by row by [`rows`]
//! from the files [`data_source`] resolves, Arrow through [`data_arrow`]), tokenized as TRL does
//! ([`tokenize`], conversational rows rendered with [`chat_template`], cut to length by
//! [`truncation`]) into [`TokenizedPair`]s, and right-padded token rows ([`padding`]). Below `train`
//! and `infer`, which both use it.

pub mod chat_template;
pub mod data;
pub mod data_arrow;
pub mod data_source;
pub mod padding;
pub mod rows;
pub mod tokenize;
pub mod tokenized;
pub mod truncation;

pub use chat_template::ChatTemplate;
pub use data::{load_preferences, parse_preferences, parse_row, split_implicit_prompt, LoadOptions, LoadedData, Message, PreferenceRow, Text};
pub use padding::RightPadded;
pub use tokenize::{JointTexts, PairTokenizer, TokenizerConfig};
pub use tokenized::TokenizedPair;
pub use truncation::{TokenizeStats, TruncationConfig, TruncationMode};
