use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use std::{
    collections::VecDeque,
    io::{self, ErrorKind},
    pin::Pin,
};
use tokio::time::{Duration, Instant, Sleep};

use crate::protocol::{self, Packet, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O = {0}")]
    Io(#[from] io::Error),
    #[error("Invalid data = {0}")]
    Protocol(#[from] protocol::Error),
    #[error["Keep alive timeout"]]
    KeepAlive,
}

/// Network transforms packets <-> frames efficiently. It takes
/// advantage of pre-allocation, buffering and vectorization when
/// appropriate to achieve performance
pub struct Network<P> {
    /// Socket for IO
    socket: Box<dyn N>,
    /// Buffered reads
    read: BytesMut,
    /// Buffered writes
    write: BytesMut,
    /// Maximum packet size
    max_incoming_size: usize,
    /// Maximum connection buffer count. TODO: Change this to use bytes for deterministicness
    max_connection_buffer_len: usize,
    /// Keep alive timeout
    keepalive: Duration,
    /// liftwire patch: when bytes last arrived. The keep-alive timer below is armed once and
    /// moved on only when it fires early, instead of a new timer per packet read.
    last_read: Instant,
    /// liftwire patch: fires at the earliest moment the keep-alive may have run out.
    keepalive_timer: Pin<Box<Sleep>>,
    /// Protocol
    protocol: P,
}

/// liftwire patch: initial size of a connection's read buffer.
const INITIAL_READ_BUFFER: usize = 1024;

/// liftwire patch: free room made in the read buffer before each read. With a nearly full
/// buffer `read_buf` reads as little as 64 bytes, and a packet then costs several reads (and
/// system calls); a read that fills the room also costs one more read that finds nothing.
const READ_ROOM: usize = 1024;

/// liftwire patch: a far deadline for a timer that must not fire (no keep-alive set yet).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

impl<P: Protocol> Network<P> {
    pub fn new(
        socket: Box<dyn N>,
        max_incoming_size: usize,
        max_connection_buffer_len: usize,
        protocol: P,
    ) -> Network<P> {
        Network {
            socket,
            // liftwire patch: 10 KiB each per connection was most of an idle connection's memory.
            // Both grow when a burst needs more (`read_buf` reserves, encoding extends); the
            // write buffer starts empty as most devices receive little.
            read: BytesMut::with_capacity(INITIAL_READ_BUFFER),
            write: BytesMut::new(),
            max_incoming_size,
            max_connection_buffer_len,
            // Overwritten by keepalive value in connect packet, otherwise we
            // would wait indefinitely until we get a packet / network error
            // when we call read.
            keepalive: Duration::MAX,
            last_read: Instant::now(),
            keepalive_timer: Box::pin(tokio::time::sleep_until(far_future())),
            protocol,
        }
    }

    pub fn set_keepalive(&mut self, keepalive: u16) {
        let keepalive = Duration::from_secs(keepalive as u64);
        self.keepalive = keepalive + keepalive.mul_f32(0.5);
        self.last_read = Instant::now();
        let deadline = self.deadline();
        self.keepalive_timer.as_mut().reset(deadline);
    }

    /// liftwire patch: when the keep-alive runs out if nothing arrives before.
    fn deadline(&self) -> Instant {
        self.last_read
            .checked_add(self.keepalive)
            .unwrap_or_else(far_future)
    }

    /// Waits on network for 1 packet. Cancel safe: bytes already read stay in the buffer.
    pub async fn read(&mut self) -> Result<Packet, Error> {
        loop {
            match Protocol::read_mut(
                &mut self.protocol,
                &mut self.read,
                self.max_incoming_size,
            ) {
                Ok(packet) => return Ok(packet),
                Err(protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.into()),
            };

            // liftwire patch: one read, then parse again (a packet may now be whole), under a
            // keep-alive timer that lives as long as the connection.
            tokio::select! {
                biased;
                read = read_some(&mut self.socket, &mut self.read) => {
                    read?;
                    self.last_read = Instant::now();
                }
                () = self.keepalive_timer.as_mut() => {
                    let deadline = self.deadline();
                    if Instant::now() >= deadline {
                        return Err(Error::KeepAlive);
                    }
                    self.keepalive_timer.as_mut().reset(deadline);
                }
            }
        }
    }

    /// Read packets in bulk. This allow replies to be in bulk. This method is used
    /// after the connection is established to read a bunch of incoming packets
    pub fn readv(&mut self, packets: &mut VecDeque<Packet>) -> Result<usize, Error> {
        loop {
            match self
                .protocol
                .read_mut(&mut self.read, self.max_incoming_size)
            {
                Ok(packet) => {
                    packets.push_back(packet);
                    let connection_buffer_length = packets.len();
                    if connection_buffer_length >= self.max_connection_buffer_len {
                        return Ok(connection_buffer_length);
                    }
                }
                Err(protocol::Error::InsufficientBytes(_)) => return Ok(packets.len()),
                Err(e) => return Err(io::Error::new(ErrorKind::InvalidData, e.to_string()).into()),
            }
        }
    }

    pub async fn write(&mut self, packet: Packet) -> Result<(), Error> {
        Protocol::write(&self.protocol, packet, &mut self.write)?;
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(())
    }

    /// liftwire patch: see [`Protocol::handled`].
    pub fn handled(&self, packet: &Packet) -> bool {
        self.protocol.handled(packet)
    }

    /// liftwire patch: PUBACKs for `pkids`, in one write.
    pub async fn write_pubacks(&mut self, pkids: &[u16]) -> Result<(), Error> {
        for &pkid in pkids {
            let ack = protocol::PubAck {
                pkid,
                reason: protocol::PubAckReason::Success,
            };
            Protocol::write(&self.protocol, Packet::PubAck(ack, None), &mut self.write)?;
        }
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(())
    }

    pub async fn writev(&mut self, packets: VecDeque<Packet>) -> Result<(), Error> {
        for packet in packets {
            Protocol::write(&self.protocol, packet, &mut self.write)?;
        }
        self.socket.write_all(&self.write).await?;
        self.write.clear();
        Ok(())
    }
}

/// liftwire patch: reads once into `buffer`, with room for [`READ_ROOM`] bytes. Not more, even
/// for a packet announced larger: the buffer grows as its bytes arrive, never on what a peer
/// that has not even authenticated claims it will send.
async fn read_some(socket: &mut Box<dyn N>, buffer: &mut BytesMut) -> io::Result<usize> {
    buffer.reserve(READ_ROOM);
    let read = socket.read_buf(buffer).await?;
    if 0 == read {
        let error = if buffer.is_empty() {
            io::Error::new(ErrorKind::ConnectionAborted, "connection closed by peer")
        } else {
            io::Error::new(ErrorKind::ConnectionReset, "connection reset by peer")
        };
        return Err(error);
    }
    Ok(read)
}

pub trait N: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T> N for T where T: AsyncRead + AsyncWrite + Unpin + Send {}
