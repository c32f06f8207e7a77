//! Read planning: groups a register map's registers into as few Modbus read requests as possible.
//!
//! Registers are grouped by table and poll period (a request is polled on one period), sorted by
//! address, and a run of strictly contiguous registers becomes one request as long as it stays
//! within the per-read limit (125 registers, 2000 bits). Gaps are never bridged: many devices
//! answer a read that touches an unmapped address with exception 2 (illegal data address), which
//! would lose the whole request. Greedy left-to-right merging is optimal here, since registers
//! cannot be split across requests.

use std::collections::BTreeMap;
use std::time::Duration;

use super::register_map::{RegisterKind, RegisterMap, RegisterSpec};

/// One Modbus read request and the registers its answer carries.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadRequest {
    pub kind: RegisterKind,
    pub start_address: u16,
    /// Registers (or bits) to read, 1..=`kind.max_items_per_read()`.
    pub count: u16,
    /// The registers inside `start_address..start_address + count`, by address.
    pub registers: Vec<RegisterSpec>,
    pub poll_period: Duration,
}

/// Plans the reads of `map`, ordered by poll period, table and address.
pub fn plan_reads(map: &RegisterMap) -> Vec<ReadRequest> {
    let mut groups: BTreeMap<(Duration, RegisterKind), Vec<&RegisterSpec>> = BTreeMap::new();
    for spec in map.registers() {
        groups
            .entry((spec.poll_period, spec.kind))
            .or_default()
            .push(spec);
    }
    let mut requests = Vec::new();
    for ((poll_period, kind), mut specs) in groups {
        specs.sort_by_key(|spec| spec.address);
        let max_items = u32::from(kind.max_items_per_read());
        let mut current: Option<ReadRequest> = None;
        for spec in specs {
            let width = u32::from(spec.register_type.width());
            if let Some(request) = current.as_mut() {
                let request_end = u32::from(request.start_address) + u32::from(request.count);
                let extends = u32::from(spec.address) == request_end
                    && u32::from(request.count) + width <= max_items;
                if extends {
                    // Cannot overflow: at most `max_items`.
                    request.count += spec.register_type.width();
                    request.registers.push(spec.clone());
                    continue;
                }
                requests.extend(current.take());
            }
            current = Some(ReadRequest {
                kind,
                start_address: spec.address,
                count: spec.register_type.width(),
                registers: vec![spec.clone()],
                poll_period,
            });
        }
        requests.extend(current);
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(registers: &[(&str, &str, u32, &str, Option<u64>)]) -> RegisterMap {
        let mut text = String::from("model = \"m\"\npoll_ms = 1000\n");
        for (metric, kind, address, register_type, poll_ms) in registers {
            text.push_str(&format!(
                "[[registers]]\nmetric = \"{metric}\"\nkind = \"{kind}\"\naddress = {address}\ntype = \"{register_type}\"\n"
            ));
            if let Some(poll_ms) = poll_ms {
                text.push_str(&format!("poll_ms = {poll_ms}\n"));
            }
        }
        RegisterMap::from_toml_str(&text, "<test>").unwrap_or_else(|err| panic!("{err}"))
    }

    fn shape(requests: &[ReadRequest]) -> Vec<(RegisterKind, u16, u16, u64)> {
        requests
            .iter()
            .map(|request| {
                (
                    request.kind,
                    request.start_address,
                    request.count,
                    request.poll_period.as_millis() as u64,
                )
            })
            .collect()
    }

    use RegisterKind::*;

    #[test]
    fn contiguous_registers_share_a_request() {
        let requests = plan_reads(&map(&[
            ("c", "holding", 3, "u16", None),
            ("a", "holding", 0, "f32", None),
            ("b", "holding", 2, "i16", None),
            ("d", "holding", 5, "u16", None),
            ("e", "input", 4, "u32", None),
            ("f", "coil", 0, "bool", None),
            ("g", "coil", 1, "bool", None),
            ("h", "discrete", 7, "bool", None),
        ]));
        assert_eq!(
            shape(&requests),
            vec![
                (Holding, 0, 4, 1000),
                (Holding, 5, 1, 1000),
                (Input, 4, 2, 1000),
                (Coil, 0, 2, 1000),
                (Discrete, 7, 1, 1000),
            ]
        );
        let metrics: Vec<&str> = requests[0]
            .registers
            .iter()
            .map(|spec| spec.metric.as_str())
            .collect();
        assert_eq!(metrics, ["a", "b", "c"]);
    }

    #[test]
    fn periods_split_requests() {
        let requests = plan_reads(&map(&[
            ("a", "holding", 0, "u16", None),
            ("b", "holding", 1, "u16", Some(100)),
            ("c", "holding", 2, "u16", None),
        ]));
        assert_eq!(
            shape(&requests),
            vec![
                (Holding, 1, 1, 100),
                (Holding, 0, 1, 1000),
                (Holding, 2, 1, 1000)
            ]
        );
    }

    #[test]
    fn requests_respect_the_125_register_limit() {
        // 70 contiguous f32 = 140 registers: 62 fit in the first request (124 registers; the
        // 63rd would make 126), the remaining 8 in the second.
        let registers: Vec<(String, u32)> = (0..70).map(|i| (format!("m{i}"), 2 * i)).collect();
        let specs: Vec<(&str, &str, u32, &str, Option<u64>)> = registers
            .iter()
            .map(|(name, address)| (name.as_str(), "input", *address, "f32", None))
            .collect();
        let requests = plan_reads(&map(&specs));
        assert_eq!(
            shape(&requests),
            vec![(Input, 0, 124, 1000), (Input, 124, 16, 1000)]
        );
        assert_eq!(requests[0].registers.len(), 62);

        // 130 contiguous u16: 125 + 5.
        let registers: Vec<(String, u32)> = (0..130).map(|i| (format!("m{i}"), i)).collect();
        let specs: Vec<(&str, &str, u32, &str, Option<u64>)> = registers
            .iter()
            .map(|(name, address)| (name.as_str(), "holding", *address, "u16", None))
            .collect();
        assert_eq!(
            shape(&plan_reads(&map(&specs))),
            vec![(Holding, 0, 125, 1000), (Holding, 125, 5, 1000)]
        );
    }
}
