//! GLUE: task definitions, TSV loaders and metrics.

pub mod data;
pub mod metrics;
pub mod tasks;
