//! Training: data, tokenization, batches, reference log-probs, the loop, checkpoints, metrics.
//!
//! Data flows: [`data`] reads TRL-format preference rows, [`tokenize`] turns them into token ids
//! as TRL does (rendering conversational rows with [`chat_template`], cutting rows to length with
//! [`truncation`]), [`batch`] collates pairs into model
//! inputs and orders them per epoch; [`trainer`] runs the graphs on ONNX Runtime.

pub mod batch;
pub mod batch_beta;
pub mod chat_template;
pub mod checkpoint;
pub mod data;
pub mod data_arrow;
pub mod data_source;
pub mod denormals;
pub mod device;
pub mod epsilon_beta;
pub mod loss_scale;
pub mod metrics;
pub mod model_limits;
pub mod reference;
pub mod rows;
pub mod schedule;
pub mod session_io;
pub mod tokenize;
pub mod tokenized;
pub mod truncation;

pub use batch::{collate, Batch, CollateOptions, DataLoader, LoaderConfig, LoaderPosition};
pub use chat_template::ChatTemplate;
pub use data::{load_preferences, parse_preferences, parse_row, split_implicit_prompt, LoadOptions, LoadedData, Message, PreferenceRow, Text};
pub use tokenize::{JointTexts, PairTokenizer, TokenizedPair, TokenizerConfig};
pub use truncation::{TokenizeStats, TruncationConfig, TruncationMode};
pub mod config;
pub mod fused_adamw;
pub mod optimizer_step;
pub mod report;
pub mod summary;
pub mod tensorboard;
pub mod trainer;
pub mod trl_config;
