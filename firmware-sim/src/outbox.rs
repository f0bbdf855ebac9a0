//! A device's persistent outbox: every envelope it produced and the backend has not yet
//! confirmed as persisted (the downlink watermark). It survives restarts of the simulator, so a
//! device resends exactly what may be missing after a crash, a partition or a gateway restart.
//!
//! On disk, one directory per device: `outbox.bin` (length-prefixed encoded envelopes, appended)
//! and `watermark` (the highest sequence number the backend confirmed). The file is rewritten
//! without the confirmed prefix once that prefix is large.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use liftwire_proto::{v1, Message};

/// Confirmed envelopes kept in the file before it is compacted.
const COMPACT_AFTER: usize = 1_000;

/// The outbox of one device.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    file: BufWriter<File>,
    /// Unconfirmed envelopes, oldest first.
    pending: VecDeque<v1::Envelope>,
    watermark: u64,
    next_seq: u64,
    confirmed_in_file: usize,
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let watermark = match fs::read_to_string(dir.join("watermark")) {
            Ok(text) => text.trim().parse().map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("watermark: {e}"))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let path = dir.join("outbox.bin");
        let mut all = Vec::new();
        if let Ok(mut f) = File::open(&path) {
            f.read_to_end(&mut all)?;
        }
        let mut pending = VecDeque::new();
        let mut confirmed_in_file = 0;
        let mut max_seq = watermark;
        let mut rest = all.as_slice();
        while rest.len() >= 4 {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if rest.len() < 4 + len {
                break; // A torn last record from a crash: it was never sent, drop it.
            }
            let envelope = v1::Envelope::decode(&rest[4..4 + len])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            rest = &rest[4 + len..];
            max_seq = max_seq.max(envelope.seq);
            if envelope.seq > watermark {
                pending.push_back(envelope);
            } else {
                confirmed_in_file += 1;
            }
        }
        let file = BufWriter::new(OpenOptions::new().create(true).append(true).open(&path)?);
        let mut outbox = Self {
            dir: dir.to_owned(),
            file,
            pending,
            watermark,
            next_seq: max_seq + 1,
            confirmed_in_file,
        };
        if outbox.confirmed_in_file > 0 || !rest.is_empty() {
            outbox.compact()?;
        }
        Ok(outbox)
    }

    /// The sequence number the next envelope must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest sequence number confirmed by the backend.
    pub fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Unconfirmed envelopes, oldest first: what to (re)send after connecting.
    pub fn pending(&self) -> impl Iterator<Item = &v1::Envelope> {
        self.pending.iter()
    }

    /// The newest envelope, if unconfirmed.
    pub fn last(&self) -> Option<&v1::Envelope> {
        self.pending.back()
    }

    /// Number of unconfirmed envelopes.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether every envelope is confirmed.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Stores `envelope` (which must carry [`Outbox::next_seq`]) before it is sent.
    pub fn push(&mut self, envelope: v1::Envelope) -> io::Result<()> {
        if envelope.seq != self.next_seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sequence {} but {} expected", envelope.seq, self.next_seq),
            ));
        }
        let bytes = envelope.encode_to_vec();
        self.file.write_all(&(bytes.len() as u32).to_le_bytes())?;
        self.file.write_all(&bytes)?;
        self.file.flush()?;
        self.next_seq += 1;
        self.pending.push_back(envelope);
        Ok(())
    }

    /// The backend persisted everything up to `seq`: drop it from the outbox. Returns true when
    /// `seq` is at or beyond this device's own numbering: the backend holds sequence numbers
    /// this outbox never issued (a new board, a wiped flash restarted at 1), so everything
    /// unconfirmed here was taken for a duplicate and dropped. The outbox then continues above
    /// `seq`: its unconfirmed envelopes are renumbered from `seq + 1`, to be sent again.
    pub fn confirm(&mut self, seq: u64) -> io::Result<bool> {
        if seq <= self.watermark {
            return Ok(false);
        }
        if seq >= self.next_seq {
            for (n, envelope) in (seq + 1..).zip(self.pending.iter_mut()) {
                envelope.seq = n;
            }
            self.next_seq = seq + 1 + self.pending.len() as u64;
            self.watermark = seq;
            self.compact()?;
            self.write_watermark()?;
            return Ok(true);
        }
        self.watermark = seq;
        while self
            .pending
            .front()
            .is_some_and(|e| e.seq <= self.watermark)
        {
            self.pending.pop_front();
            self.confirmed_in_file += 1;
        }
        self.write_watermark()?;
        if self.confirmed_in_file >= COMPACT_AFTER {
            self.compact()?;
        }
        Ok(false)
    }

    fn write_watermark(&self) -> io::Result<()> {
        let tmp = self.dir.join("watermark.tmp");
        fs::write(&tmp, self.watermark.to_string())?;
        fs::rename(&tmp, self.dir.join("watermark"))
    }

    /// Rewrites the file with the unconfirmed envelopes only.
    fn compact(&mut self) -> io::Result<()> {
        let tmp = self.dir.join("outbox.tmp");
        {
            let mut out = BufWriter::new(File::create(&tmp)?);
            for envelope in &self.pending {
                let bytes = envelope.encode_to_vec();
                out.write_all(&(bytes.len() as u32).to_le_bytes())?;
                out.write_all(&bytes)?;
            }
            out.flush()?;
        }
        let path = self.dir.join("outbox.bin");
        fs::rename(&tmp, &path)?;
        self.file = BufWriter::new(OpenOptions::new().append(true).open(&path)?);
        self.confirmed_in_file = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(seq: u64) -> v1::Envelope {
        v1::Envelope {
            schema_version: 1,
            device_id: "d".into(),
            seq,
            ..Default::default()
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("liftwire-outbox-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn survives_restarts_and_trims_on_confirmation() {
        let dir = temp_dir("restart");
        {
            let mut outbox = Outbox::open(&dir).unwrap();
            assert_eq!(outbox.next_seq(), 1);
            for seq in 1..=5 {
                outbox.push(envelope(seq)).unwrap();
            }
            outbox.confirm(3).unwrap();
            assert_eq!(outbox.pending().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        }
        let mut outbox = Outbox::open(&dir).unwrap();
        assert_eq!(outbox.watermark(), 3);
        assert_eq!(
            outbox.next_seq(),
            6,
            "sequence numbers continue across restarts"
        );
        assert_eq!(outbox.pending().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        assert!(outbox.push(envelope(9)).is_err(), "gaps are refused");
        outbox.confirm(5).unwrap();
        assert!(outbox.is_empty());
        // A watermark from the past changes nothing.
        outbox.confirm(2).unwrap();
        assert_eq!(outbox.watermark(), 5);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_watermark_beyond_its_own_numbering_renumbers_what_is_unconfirmed() {
        // A new board restarted at 1 while the backend holds up to 2,000,000: its messages were
        // taken for duplicates. It continues above the watermark instead of dropping them.
        let dir = temp_dir("renumber");
        {
            let mut outbox = Outbox::open(&dir).unwrap();
            for seq in 1..=3 {
                outbox.push(envelope(seq)).unwrap();
            }
            assert!(outbox.confirm(2_000_000).unwrap());
            assert_eq!(
                outbox.pending().map(|e| e.seq).collect::<Vec<_>>(),
                [2_000_001, 2_000_002, 2_000_003]
            );
            assert_eq!(outbox.next_seq(), 2_000_004);
            assert!(
                !outbox.confirm(2_000_002).unwrap(),
                "an ordinary confirmation"
            );
        }
        let outbox = Outbox::open(&dir).unwrap();
        assert_eq!(outbox.watermark(), 2_000_002);
        assert_eq!(
            outbox.pending().map(|e| e.seq).collect::<Vec<_>>(),
            [2_000_003]
        );
        assert_eq!(outbox.next_seq(), 2_000_004);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compacts_and_drops_a_torn_last_record() {
        let dir = temp_dir("compact");
        {
            let mut outbox = Outbox::open(&dir).unwrap();
            for seq in 1..=(COMPACT_AFTER as u64 + 10) {
                outbox.push(envelope(seq)).unwrap();
            }
            outbox.confirm(COMPACT_AFTER as u64).unwrap();
        }
        let size = fs::metadata(dir.join("outbox.bin")).unwrap().len();
        assert!(
            size < 200,
            "compacted to the 10 pending envelopes ({size} bytes)"
        );
        // A crash in the middle of an append leaves a torn record.
        OpenOptions::new()
            .append(true)
            .open(dir.join("outbox.bin"))
            .unwrap()
            .write_all(&[50, 0, 0, 0, 1, 2])
            .unwrap();
        let outbox = Outbox::open(&dir).unwrap();
        assert_eq!(outbox.len(), 10);
        assert_eq!(outbox.next_seq(), COMPACT_AFTER as u64 + 11);
        fs::remove_dir_all(&dir).unwrap();
    }
}
