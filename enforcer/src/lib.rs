//! The agent egress enforcer: the daemon and CLI that sit between AI agents and the network.
//!
//! One module per pipeline stage, with the plain data that passes between them in [`model`]:
//! `capture` (eBPF + cgroups) → `proxy` (accept, original destination, TLS) → `inspect` (classify → `Action`)
//! → `policy` (evaluate → `Decision`) → `constrain` (rewrite) → forward or block → `audit` (hash chain).
//! Beside the pipeline: `session` (per-agent-run state rules read and write: labels, counters, the person the agent
//! acts for), `review` (exchanges held for a person's approval) and `trace` (retained exchanges, encrypted).
//! `daemon` wires the stages together for `enforcer run`; `service` (systemd notify, health, setup checks),
//! `control` (the local control socket behind `enforcer status`) and `metrics` (Prometheus) operate it; `cli` is
//! the command line. This crate owns no kernel code:
//! the programs it loads live in `enforcer-ebpf`.

// The stages and the data between them: used by the binary, the tests, the benches and the fuzz targets.
pub mod audit;
pub mod capture;
pub mod cli;
pub mod config;
pub mod constrain;
pub mod dns;
pub mod inspect;
pub mod jsonpath;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod proxy;
pub mod review;
pub mod session;
pub mod trace;

// Internal: the daemon's wiring and operation, and helpers the stages share.
mod control;
mod daemon;
mod encoding;
mod glob;
mod host;
mod pidfd;
mod sched;
mod service;

pub use audit::{AuditConfig, AuditLog};
pub use config::Config;
pub use model::{Action, Agent, AuditEvent, Decision, Verdict};
pub use policy::Policy;
pub use proxy::ProxyContext;
