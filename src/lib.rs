//! ferry: declarative pipelines that run ONNX models over Arrow data, queried with SQL.
//!
//! - [`spec`]: the pipeline file and its diagnostics.
//! - [`source`] / [`sink`]: where rows come from and go to (every sink an [`sink::Output`]).
//! - [`ops`]: operator manifests and task kinds (model-backed SQL functions).
//! - [`runtime`]: ONNX Runtime loading, model directories and the session pool.
//! - [`engine`]: planning and running a pipeline; [`query`]: `ferry query`; [`shell`]: its
//!   interactive SQL shell; [`render`]: `ferry render`.
//! - [`stream`]: the micro-batch loop over a Kafka source: offsets, commits, rebalances.
//! - [`metrics`]: Prometheus metrics and the `/metrics` endpoint.

pub mod cli;
pub mod cluster;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod job;
pub mod metrics;
pub mod ops;
pub mod query;
pub mod render;
pub mod runtime;
pub mod schemas;
pub mod shell;
pub mod sink;
pub mod source;
pub mod spec;
pub mod stream;

pub use datafusion;
pub use ort;
pub use rdkafka;
