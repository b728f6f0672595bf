//! End-to-end tests of the `elsinore` binary as an operator runs it: a
//! config file on disk, listeners bound from it, signals, environment
//! variables, and the `catalog` and `check` commands. Each test starts real
//! processes (killed when it ends, however it ends) on a loopback block of
//! its own, and waits on conditions with bounded retries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog_cli;
mod cli;
mod env;
mod federation;
mod harness;
mod operability;
mod reload;
mod signals;
mod sigterm_drain;
