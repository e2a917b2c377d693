//! tessera-loadtest: an open-loop load generator for any Matrix homeserver
//! (and TURN relay), speaking only the public client-server API.
//!
//! Entry points: [`run::run_blocking`] runs a [`config::Plan`] and returns a
//! [`report::Report`]; the `tessera-loadtest` binary wraps it with a CLI and
//! writes the JSON report, the summary and the SVG plot.
//!
//! Map: `schedule` (sans-IO arrival times), `hist` (HDR histograms),
//! `metrics` (the recorder), `delivery` (send→sync matching), `http` (the
//! keep-alive pool), `matrix` (the API calls), `syncloop` (pipelined
//! `/sync` loops), `run` (phases and drivers),
//! `split` (what each generator thread owns, and where threads meet),
//! `report` / `plot` (outputs), `target` (loopback guard), `sys` (CPU and
//! memory), `server_config` (configs for servers under test), `stun` / `turn`
//! (TURN client codec and driver).

pub mod config;
pub mod delivery;
pub mod hist;
pub mod http;
pub mod matrix;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod server_config;
pub mod split;
pub mod stun;
pub mod syncloop;
pub mod sys;
pub mod target;
pub mod turn;
pub mod udp_gso;
