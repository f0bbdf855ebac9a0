//! The few MQTT 3.1.1 packets liftwire writes and reads by hand, without a client library.
//!
//! * The gateway's downlink bridge encodes a QoS 1 PUBLISH for rumqttd's codec to parse.
//! * The simulator's load devices must outrun the systems they measure on a single core. A general
//!   client (rumqttc: a request channel, an event loop and an event per packet) costs several
//!   times the broker's own work per message, so they speak the protocol directly: one `write`
//!   per PUBLISH from a reused buffer, PUBACKs parsed in place from whatever one `read` returned.
//! * Raw-protocol tests of the gateway write exact packets (split, bursts, odd packet ids).

use std::fmt;

use prost::bytes::BufMut;

/// Packet type nibbles (first byte, high four bits).
const CONNECT: u8 = 0x10;
const CONNACK: u8 = 0x20;
const PUBLISH: u8 = 0x30;
const PUBACK: u8 = 0x40;
const PINGRESP: u8 = 0xD0;

/// A CONNACK accepting the connection (session not present).
pub const CONNACK_ACCEPTED: [u8; 4] = [CONNACK, 0x02, 0x00, 0x00];
/// A PINGREQ packet.
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
/// A DISCONNECT packet.
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// What the broker sent that a load device cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// CONNACK with its return code (0 = accepted).
    ConnAck(u8),
    /// PUBACK for this packet id.
    PubAck(u16),
    /// PINGRESP.
    PingResp,
    /// Any other packet (ignored by load devices).
    Other(u8),
}

/// The broker sent bytes that are not MQTT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(&'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed MQTT from the broker: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// Appends MQTT's variable-length "remaining length".
pub fn put_remaining_length(out: &mut impl BufMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut impl BufMut, s: &str) {
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// A CONNECT with a clean session, `keep_alive` seconds and, if given, username and password.
pub fn connect(client_id: &str, credentials: Option<(&str, &str)>, keep_alive: u16) -> Vec<u8> {
    let mut flags = 0b0000_0010;
    if credentials.is_some() {
        flags |= 0b1100_0000;
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(&mut body, client_id);
    if let Some((username, password)) = credentials {
        put_str(&mut body, username);
        put_str(&mut body, password);
    }
    let mut packet = vec![CONNECT];
    put_remaining_length(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

/// Appends a PUBLISH of `payload` on `topic` to `out`: QoS 1 if `pkid` is given, else QoS 0.
pub fn put_publish(
    out: &mut impl BufMut,
    topic: &str,
    pkid: Option<u16>,
    retain: bool,
    payload: &[u8],
) {
    let qos = if pkid.is_some() { 0b010 } else { 0 };
    out.put_u8(PUBLISH | qos | u8::from(retain));
    let len = 2 + topic.len() + if pkid.is_some() { 2 } else { 0 } + payload.len();
    put_remaining_length(out, len);
    put_str(out, topic);
    if let Some(pkid) = pkid {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

/// Takes the first complete packet off `buf`: `Ok(None)` if more bytes are needed.
pub fn next_packet(buf: &mut Vec<u8>, start: &mut usize) -> Result<Option<Incoming>, Malformed> {
    let bytes = &buf[*start..];
    let Some(&first) = bytes.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut header = 1;
    loop {
        let Some(&byte) = bytes.get(header) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7F) << (7 * (header - 1));
        header += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if header > 4 {
            return Err(Malformed("remaining length over four bytes"));
        }
    }
    let Some(body) = bytes.get(header..header + len) else {
        return Ok(None);
    };
    let packet = match first & 0xF0 {
        CONNACK if len == 2 => Incoming::ConnAck(body[1]),
        PUBACK if len == 2 => Incoming::PubAck(u16::from_be_bytes([body[0], body[1]])),
        PINGRESP if len == 0 => Incoming::PingResp,
        CONNACK | PUBACK | PINGRESP => {
            return Err(Malformed("bad length for CONNACK, PUBACK or PINGRESP"))
        }
        other => Incoming::Other(other),
    };
    *start += header + len;
    if *start == buf.len() {
        buf.clear();
        *start = 0;
    }
    Ok(Some(packet))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn remaining_length_uses_continuation_bytes() {
        for (len, expected) in [
            (0, vec![0x00]),
            (127, vec![0x7F]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xFF, 0x7F]),
            (16_384, vec![0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_remaining_length(&mut out, len);
            assert_eq!(out, expected, "length {len}");
        }
    }

    #[test]
    fn connect_and_publish_have_the_spec_layout() {
        let packet = connect("d1", Some(("d1", "pw")), 30);
        assert_eq!(
            packet,
            [
                &[0x10, 22, 0, 4][..],
                b"MQTT",
                &[4, 0b1100_0010, 0, 30, 0, 2],
                b"d1",
                &[0, 2],
                b"d1",
                &[0, 2],
                b"pw"
            ]
            .concat()
        );
        let mut out = vec![9];
        put_publish(&mut out, "a/b", Some(0x0102), false, b"xy");
        assert_eq!(
            out,
            [&[9, 0x32, 9, 0, 3][..], b"a/b", &[1, 2], b"xy"].concat()
        );
        out.clear();
        put_publish(&mut out, "a/b", None, false, b"xy");
        assert_eq!(out, [&[0x30, 7, 0, 3][..], b"a/b", b"xy"].concat());
        out.clear();
        put_publish(&mut out, "a/b", Some(1), true, b"");
        assert_eq!(out, [&[0x33, 7, 0, 3][..], b"a/b", &[0, 1]].concat());
    }

    #[test]
    fn packets_are_taken_whole_across_reads() {
        // A CONNACK, a PUBACK for 7 and half of a PUBACK for 8, then its other half.
        let mut buf = vec![0x20, 2, 0, 0, 0x40, 2, 0, 7, 0x40, 2];
        let mut start = 0;
        assert_eq!(
            next_packet(&mut buf, &mut start),
            Ok(Some(Incoming::ConnAck(0)))
        );
        assert_eq!(
            next_packet(&mut buf, &mut start),
            Ok(Some(Incoming::PubAck(7)))
        );
        assert_eq!(next_packet(&mut buf, &mut start), Ok(None));
        buf.extend_from_slice(&[0, 8, 0xD0, 0]);
        assert_eq!(
            next_packet(&mut buf, &mut start),
            Ok(Some(Incoming::PubAck(8)))
        );
        assert_eq!(
            next_packet(&mut buf, &mut start),
            Ok(Some(Incoming::PingResp))
        );
        assert!(buf.is_empty(), "a fully consumed buffer is reset");
        let mut bad = vec![0x40, 3, 0, 1, 2];
        assert!(next_packet(&mut bad, &mut 0).is_err());
        let mut endless = vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert!(next_packet(&mut endless, &mut 0).is_err());
    }
}
