//! The poller's handle on the serial line: a shared, clonable transport that tokio-modbus's RTU
//! client reads and writes through, and that cleans up the two things the client's decoder
//! handles badly.
//!
//! # What tokio-modbus 0.17 does with stray bytes
//!
//! Its RTU response decoder takes the frame length from the byte where it expects the function
//! code. After one stray byte that is the unit id, read as a function code. If the length this
//! implies fits in the bytes received, the CRC check fails, the decoder drops one byte and tries
//! again: it resynchronises. If the implied length is longer than the real answer (a stray byte
//! before unit 4's answer to function 4 reads as "function 4, byte count 4"), the decoder waits
//! for bytes that never come and the request times out. The client also clears only its own read
//! buffer before a request, so a late answer to a timed-out request that is still in the OS
//! buffer is read as the answer to the next one.
//!
//! This transport therefore, per request ([`SharedPort::begin_transaction`]):
//! - discards whatever input is pending before the request is written (stale answers, noise);
//! - drops received bytes until the first byte equal to the addressed unit id, since an RTU
//!   answer must start with it;
//! - counts bytes received, so the poller can tell "no answer" (timeout) from "an answer that
//!   never decoded" (CRC or framing error, retried once by default).
//!
//! The port sits behind an `Arc<Mutex<…>>` so that the poller can throw a client away after an
//! error (tokio's `Framed` yields `None` once after a decode error, which the client would
//! report as a broken pipe) and attach a fresh one without reopening the port.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most stale bytes discarded before one request; a line that keeps talking (another master, a
/// babbling device) must not keep the request from being sent.
const MAX_STALE_BYTES_PER_REQUEST: u64 = 4_096;

/// What the line did during one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransactionReport {
    /// Bytes read from the line after the request was written, stray bytes included.
    pub bytes_received: u64,
    /// Bytes dropped before the first byte of the answer.
    pub stray_bytes_discarded: u64,
    /// Bytes pending before the request was written, discarded.
    pub stale_bytes_discarded: u64,
}

#[derive(Debug, Default)]
struct TransactionState {
    discard_stale_input: bool,
    /// The unit id the answer must start with, until its first byte has been seen.
    awaited_first_byte: Option<u8>,
    report: TransactionReport,
}

#[derive(Debug)]
struct PortState<T> {
    io: T,
    transaction: TransactionState,
}

/// A clonable handle on one serial line (or any byte stream in tests).
#[derive(Debug)]
pub struct SharedPort<T> {
    state: Arc<Mutex<PortState<T>>>,
}

impl<T> Clone for SharedPort<T> {
    fn clone(&self) -> Self {
        Self {
            state: Arc::clone(&self.state),
        }
    }
}

impl<T> SharedPort<T> {
    pub fn new(io: T) -> Self {
        Self {
            state: Arc::new(Mutex::new(PortState {
                io,
                transaction: TransactionState::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PortState<T>> {
        // Nothing panics while holding the lock, and the state stays consistent if it did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a request to `unit_id`: pending input is discarded before the request is written,
    /// and bytes before the answer's first byte are dropped.
    pub fn begin_transaction(&self, unit_id: u8) {
        self.lock().transaction = TransactionState {
            discard_stale_input: true,
            awaited_first_byte: Some(unit_id),
            report: TransactionReport::default(),
        };
    }

    /// What the line did since [`Self::begin_transaction`].
    pub fn transaction_report(&self) -> TransactionReport {
        self.lock().transaction.report
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SharedPort<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = self.lock();
        let PortState { io, transaction } = &mut *guard;
        loop {
            let Some(first_byte) = transaction.awaited_first_byte else {
                let filled_before = buf.filled().len();
                ready!(Pin::new(&mut *io).poll_read(cx, buf))?;
                transaction.report.bytes_received += (buf.filled().len() - filled_before) as u64;
                return Poll::Ready(Ok(()));
            };
            let mut scratch = [0u8; 256];
            let limit = buf.remaining().min(scratch.len());
            if limit == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut scratch_buf = ReadBuf::new(&mut scratch[..limit]);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut scratch_buf))?;
            let received = scratch_buf.filled();
            if received.is_empty() {
                // End of stream: pass it on.
                return Poll::Ready(Ok(()));
            }
            transaction.report.bytes_received += received.len() as u64;
            match received.iter().position(|&byte| byte == first_byte) {
                Some(start) => {
                    transaction.report.stray_bytes_discarded += start as u64;
                    transaction.awaited_first_byte = None;
                    buf.put_slice(&received[start..]);
                    return Poll::Ready(Ok(()));
                }
                // All stray: read on rather than return zero bytes, which would mean EOF.
                None => transaction.report.stray_bytes_discarded += received.len() as u64,
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for SharedPort<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut guard = self.lock();
        let PortState { io, transaction } = &mut *guard;
        if transaction.discard_stale_input {
            while transaction.report.stale_bytes_discarded < MAX_STALE_BYTES_PER_REQUEST {
                let mut scratch = [0u8; 256];
                let mut scratch_buf = ReadBuf::new(&mut scratch);
                match Pin::new(&mut *io).poll_read(cx, &mut scratch_buf) {
                    Poll::Ready(Ok(())) if !scratch_buf.filled().is_empty() => {
                        transaction.report.stale_bytes_discarded +=
                            scratch_buf.filled().len() as u64;
                    }
                    // End of stream: the read after the write will report it.
                    Poll::Ready(Ok(())) => break,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    // Nothing pending. The read registered this task's waker; a spurious wake
                    // later is harmless.
                    Poll::Pending => break,
                }
            }
            transaction.discard_stale_input = false;
        }
        Pin::new(&mut *io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.lock().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.lock().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_modbus::client::{rtu, Client};
    use tokio_modbus::{Request, Response, Slave};

    use super::*;
    use crate::modbus::rtu::encode_registers_response;

    /// A device end that answers the first request with `answer`.
    async fn answer_once(mut device_end: DuplexStream, answer: Vec<u8>) -> DuplexStream {
        let mut request = [0u8; 8];
        device_end.read_exact(&mut request).await.unwrap();
        device_end.write_all(&answer).await.unwrap();
        device_end
    }

    fn with_stray_byte(stray: u8, frame: Vec<u8>) -> Vec<u8> {
        let mut bytes = vec![stray];
        bytes.extend(frame);
        bytes
    }

    /// Pins what tokio-modbus 0.17 does on its own: one stray 0x00 before unit 4's answer to a
    /// one-register input read makes its decoder read "function 4, 4 data bytes" and wait for a
    /// ninth byte that never comes.
    #[tokio::test(start_paused = true)]
    async fn tokio_modbus_alone_stalls_on_a_stray_byte_that_announces_a_longer_frame() {
        let (poller_end, device_end) = tokio::io::duplex(1024);
        let answer = with_stray_byte(0x00, encode_registers_response(4, 0x04, &[42]));
        let device = tokio::spawn(answer_once(device_end, answer));
        let mut client = rtu::attach_slave(poller_end, Slave(4));
        let result = tokio::time::timeout(
            Duration::from_secs(1),
            client.call(Request::ReadInputRegisters(0, 1)),
        )
        .await;
        assert!(result.is_err(), "expected a timeout, got {result:?}");
        drop(device.await.unwrap());
    }

    /// The same answer through `SharedPort`: the stray byte is dropped before the decoder sees it.
    #[tokio::test(start_paused = true)]
    async fn shared_port_drops_stray_bytes_before_the_answer() {
        let (poller_end, device_end) = tokio::io::duplex(1024);
        let answer = with_stray_byte(0x00, encode_registers_response(4, 0x04, &[42]));
        let device = tokio::spawn(answer_once(device_end, answer));
        let port = SharedPort::new(poller_end);
        let mut client = rtu::attach_slave(port.clone(), Slave(4));
        port.begin_transaction(4);
        let response = tokio::time::timeout(
            Duration::from_secs(1),
            client.call(Request::ReadInputRegisters(0, 1)),
        )
        .await
        .expect("answered in time")
        .expect("no transport error");
        assert_eq!(response, Ok(Response::ReadInputRegisters(vec![42])));
        assert_eq!(
            port.transaction_report(),
            TransactionReport {
                bytes_received: 8,
                stray_bytes_discarded: 1,
                stale_bytes_discarded: 0
            }
        );
        drop(device.await.unwrap());
    }

    /// tokio-modbus does resynchronise when the stray byte implies a frame that fits: here 0xff
    /// before unit 1's answer to function 3 reads as "function 1, 3 data bytes", fails the CRC,
    /// and the decoder drops a byte and finds the real frame.
    #[tokio::test(start_paused = true)]
    async fn tokio_modbus_alone_resynchronises_when_the_implied_frame_fits() {
        let (poller_end, device_end) = tokio::io::duplex(1024);
        let answer = with_stray_byte(0xff, encode_registers_response(1, 0x03, &[7, 8]));
        let device = tokio::spawn(answer_once(device_end, answer));
        let mut client = rtu::attach_slave(poller_end, Slave(1));
        let response = tokio::time::timeout(
            Duration::from_secs(1),
            client.call(Request::ReadHoldingRegisters(0, 2)),
        )
        .await
        .expect("answered in time")
        .expect("no transport error");
        assert_eq!(response, Ok(Response::ReadHoldingRegisters(vec![7, 8])));
        drop(device.await.unwrap());
    }

    /// A late answer still pending from an earlier request is discarded, not taken as the answer
    /// to the next one.
    #[tokio::test(start_paused = true)]
    async fn stale_input_is_discarded_before_a_request() {
        let (poller_end, mut device_end) = tokio::io::duplex(1024);
        device_end
            .write_all(&encode_registers_response(1, 0x03, &[666]))
            .await
            .unwrap();
        let port = SharedPort::new(poller_end);
        let mut client = rtu::attach_slave(port.clone(), Slave(1));
        let device = tokio::spawn(answer_once(
            device_end,
            encode_registers_response(1, 0x03, &[1]),
        ));
        port.begin_transaction(1);
        let response = tokio::time::timeout(
            Duration::from_secs(1),
            client.call(Request::ReadHoldingRegisters(0, 1)),
        )
        .await
        .expect("answered in time")
        .expect("no transport error");
        assert_eq!(response, Ok(Response::ReadHoldingRegisters(vec![1])));
        assert_eq!(port.transaction_report().stale_bytes_discarded, 7);
        drop(device.await.unwrap());
    }
}
