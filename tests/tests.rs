//! ferry's integration tests: one binary, a module per area.

mod util;

mod audio;
mod bad_input;
mod cli;
mod cluster;
mod generation;
mod golden;
mod gpu;
mod jobs;
mod pipeline;
mod quickstart;
mod repeats;
mod spec;
mod stream;
mod vision;
