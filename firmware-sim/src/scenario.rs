//! Named chaos scenarios, usable from tests and from `liftwire-firmware-sim trace --scenario`.

use liftwire_proto::naming::Uplink;
use liftwire_proto::v1;

use crate::elevator::Incident;
use crate::fleet::Fleet;

const MINUTE_MS: u64 = 60_000;

/// A named scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Passengers trapped in the first elevator for 25 minutes.
    Entrapment,
    /// The first elevator's doors are held open at its next 10 stops.
    DoorReopenStorm,
    /// Every elevator of the first building faults within a minute (blocking, 5 to 15 minutes).
    FaultBurst,
    /// The first building loses mains power for 20 minutes.
    PowerLoss,
    /// The first elevator's clock jumps two hours ahead.
    ClockSkew,
    /// A planned 45-minute maintenance visit on the first elevator.
    Maintenance,
}

impl Scenario {
    /// What happens to the `index`-th elevator of the fleet, if anything: most scenarios hit the
    /// first elevator, fault bursts and power losses every elevator of the first building.
    pub fn incident(self, index: usize, in_first_building: bool) -> Option<Incident> {
        match self {
            Scenario::FaultBurst if in_first_building => Some(Incident::Fault {
                code: [
                    v1::FaultCode::DoorLock,
                    v1::FaultCode::Drive,
                    v1::FaultCode::Controller,
                ][index % 3],
                vendor_code: format!("E-{:04}", 100 + index),
                blocking: true,
                duration_ms: (5 + 5 * (index as u64 % 3)) * MINUTE_MS,
            }),
            Scenario::PowerLoss if in_first_building => Some(Incident::PowerLoss {
                duration_ms: 20 * MINUTE_MS,
            }),
            Scenario::Entrapment if index == 0 => Some(Incident::Entrapment {
                duration_ms: 25 * MINUTE_MS,
            }),
            Scenario::DoorReopenStorm if index == 0 => {
                Some(Incident::DoorReopenStorm { stops: 10 })
            }
            Scenario::ClockSkew if index == 0 => Some(Incident::ClockSkew {
                offset_ms: 2 * 3600 * 1000,
            }),
            Scenario::Maintenance if index == 0 => Some(Incident::Maintenance {
                planned: true,
                duration_ms: 45 * MINUTE_MS,
            }),
            _ => None,
        }
    }

    /// The same scenario as chaos commands for a running fleet (`liftwire-firmware-sim run
    /// --scenario`): which devices, which incident.
    pub fn commands(
        self,
        fleet: &crate::FleetConfig,
    ) -> Result<Vec<crate::device::ChaosCommand>, liftwire_proto::naming::IdError> {
        use crate::device::{Chaos, Target};
        let elevators = Fleet::new(fleet)?.into_elevators();
        let first_building = elevators.first().map(|(b, _)| b.clone());
        Ok(elevators
            .iter()
            .enumerate()
            .filter_map(|(i, (building, elevator))| {
                let incident = self.incident(i, Some(building) == first_building.as_ref())?;
                Some((
                    Target::Device(elevator.device().clone()),
                    Chaos::Incident(incident),
                ))
            })
            .collect())
    }

    /// Starts the scenario on `fleet` now; returns what the devices send at once.
    pub fn apply(self, fleet: &mut Fleet) -> Vec<(Uplink, v1::Envelope)> {
        let first = fleet.first_building();
        fleet.inject(|i, building| self.incident(i, building == first))
    }
}
