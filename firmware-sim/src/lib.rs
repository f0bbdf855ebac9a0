//! Simulated elevator firmware: a controller state machine per elevator, driven by a seeded
//! traffic profile in simulated time, producing exactly the envelopes real firmware sends
//! (periodic telemetry and the contract's events, numbered by a per-device sequence).
//!
//! Deterministic: the same seed, fleet and duration produce the same envelopes, byte for byte.

pub mod device;
pub mod elevator;
pub mod fleet;
pub mod load;
pub mod outbox;
pub mod run;
pub mod scenario;
pub mod screen;

pub use elevator::{Elevator, ElevatorSpec, Incident, TrafficProfile};
pub use fleet::{Fleet, FleetConfig};
pub use scenario::Scenario;
