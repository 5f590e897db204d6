//! Per-channel flow control, counted in bytes.
//!
//! Each channel's receiver grants its sender a window of credit (the receiver's handshake
//! `window`). A DATA frame costs [`data_cost`]: its body length plus the 16-byte header. The
//! sender may send whenever its credit is positive, even if the message costs more than what
//! is left, so one message larger than the window still passes (credit goes negative and the
//! sender waits for grants). The receiver grants credit back as the application consumes
//! messages, batching grants until half a window has been consumed, so a ping-pong exchange
//! of small messages sends no CREDIT frames at all.
//!
//! # Bounds
//!
//! From the sender's rule, the bytes a receiver holds that it has not granted back
//! ("outstanding") never exceed `window + max_frame + 16`: before the last send the sender's
//! view of outstanding was below `window`, and one frame adds at most `max_frame + 16`. A peer
//! that exceeds this ignored its credit, and [`RecvWindow::handle_data`] reports it.
//!
//! No deadlock: the sender is blocked only while outstanding is at least `window`; once the
//! application has consumed those bytes, the consumed total is at least `window / 2`, so a
//! grant is due.

use std::fmt;

use super::frame::HEADER_LEN;

/// The credit a DATA frame with a `body_len`-byte body costs.
pub(crate) fn data_cost(body_len: usize) -> u64 {
    body_len as u64 + HEADER_LEN as u64
}

/// The sending side of one channel's flow control.
///
/// ```text
/// let mut credit = SendCredit::new(negotiated.peer_window);
/// if credit.can_send() {
///     credit.spend(data_cost(body_len));
/// }
/// credit.handle_grant(4096);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SendCredit {
    credit: i64,
}

impl SendCredit {
    /// Starts with the peer's window.
    pub(crate) fn new(peer_window: u32) -> Self {
        Self {
            credit: peer_window.into(),
        }
    }

    /// Whether a message may be sent now: the credit is positive.
    pub(crate) fn can_send(&self) -> bool {
        self.credit > 0
    }

    /// Charges a sent message's cost ([`data_cost`]); the credit may go negative.
    pub(crate) fn spend(&mut self, cost: u64) {
        self.credit = self
            .credit
            .saturating_sub(i64::try_from(cost).unwrap_or(i64::MAX));
    }

    /// Adds a CREDIT frame's grant.
    pub(crate) fn handle_grant(&mut self, grant: u32) {
        self.credit = self.credit.saturating_add(grant.into());
    }

    /// The current credit in bytes (negative after an oversized message).
    #[cfg(test)]
    pub(crate) fn credit(&self) -> i64 {
        self.credit
    }
}

/// The receiving side of one channel's flow control.
///
/// ```text
/// let mut window = RecvWindow::new(negotiated.local_window, negotiated.max_frame);
/// window.handle_data(data_cost(body.len()))?; // on arrival; error => GOAWAY
/// if let Some(grant) = window.consume(cost) { // when the application takes it
///     encode_credit(&mut out, chan, grant);
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecvWindow {
    window: u32,
    /// Received but not granted back.
    outstanding: u64,
    /// Consumed but not granted back (a part of `outstanding`).
    consumed: u64,
    /// Largest legal `outstanding`.
    limit: u64,
}

impl RecvWindow {
    /// A window of `window` bytes (our handshake `window`) for frames of at most `max_frame`.
    pub(crate) fn new(window: u32, max_frame: u32) -> Self {
        Self {
            window,
            outstanding: 0,
            consumed: 0,
            limit: u64::from(window) + u64::from(max_frame) + HEADER_LEN as u64,
        }
    }

    /// Accounts for an arriving DATA frame costing `cost`.
    ///
    /// # Errors
    ///
    /// [`CreditExceeded`] if the sender has overrun its credit; the session answers with
    /// GOAWAY (protocol error).
    pub(crate) fn handle_data(&mut self, cost: u64) -> Result<(), CreditExceeded> {
        let outstanding = self.outstanding.saturating_add(cost);
        if outstanding > self.limit {
            return Err(CreditExceeded {
                outstanding,
                limit: self.limit,
            });
        }
        self.outstanding = outstanding;
        Ok(())
    }

    /// Accounts for the application consuming (or the session discarding) a message that
    /// cost `cost`; returns a grant to send in a CREDIT frame once half a window is due.
    pub(crate) fn consume(&mut self, cost: u64) -> Option<u32> {
        // Never grant back more than was received: a caller bug must not inflate credit.
        self.consumed = self.consumed.saturating_add(cost).min(self.outstanding);
        if self.consumed == 0 || self.consumed < u64::from(self.window / 2) {
            return None;
        }
        let grant = u32::try_from(self.consumed).unwrap_or(u32::MAX);
        self.consumed -= u64::from(grant);
        self.outstanding -= u64::from(grant);
        Some(grant)
    }

    /// Bytes received and not yet granted back.
    #[cfg(test)]
    pub(crate) fn outstanding(&self) -> u64 {
        self.outstanding
    }
}

/// The peer sent more DATA on a channel than its credit allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CreditExceeded {
    /// Outstanding bytes including the offending frame.
    pub(crate) outstanding: u64,
    /// The most a well-behaved sender can have outstanding.
    pub(crate) limit: u64,
}

impl fmt::Display for CreditExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer exceeded its credit: {} bytes outstanding, limit {}",
            self.outstanding, self.limit
        )
    }
}

impl std::error::Error for CreditExceeded {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_includes_the_header() {
        assert_eq!(data_cost(0), 16);
        assert_eq!(data_cost(100), 116);
    }

    #[test]
    fn send_credit_goes_negative_once() {
        let mut c = SendCredit::new(4096);
        assert!(c.can_send());
        c.spend(4000);
        assert!(c.can_send());
        c.spend(10_000); // larger than what is left: allowed, credit goes negative
        assert_eq!(c.credit(), 4096 - 14_000);
        assert!(!c.can_send());
        c.handle_grant(9904);
        assert!(!c.can_send()); // exactly zero is not positive
        c.handle_grant(1);
        assert!(c.can_send());
        c.handle_grant(u32::MAX);
        c.spend(u64::MAX);
        assert!(!c.can_send());
    }

    #[test]
    fn grants_are_batched_at_half_a_window() {
        let mut w = RecvWindow::new(4096, 65536);
        for _ in 0..20 {
            w.handle_data(100).unwrap();
            assert_eq!(w.consume(100), None);
        }
        w.handle_data(100).unwrap();
        assert_eq!(w.consume(100), Some(2100));
        assert_eq!(w.outstanding(), 0);
        assert_eq!(w.consume(0), None);
    }

    #[test]
    fn oversized_message_is_granted_back_whole() {
        let mut w = RecvWindow::new(4096, 65536);
        w.handle_data(50_000).unwrap();
        assert_eq!(w.consume(50_000), Some(50_000));
    }

    #[test]
    fn overrun_is_detected() {
        let mut w = RecvWindow::new(4096, 65536);
        w.handle_data(4095).unwrap();
        w.handle_data(65536 + 16).unwrap(); // the last send while credit was positive
        w.handle_data(1).unwrap(); // one byte of slack: the limit is inclusive
        assert_eq!(
            w.handle_data(1),
            Err(CreditExceeded {
                outstanding: 4095 + 65552 + 2,
                limit: 4096 + 65552
            })
        );
    }

    #[test]
    fn consume_never_grants_more_than_received() {
        let mut w = RecvWindow::new(4096, 65536);
        w.handle_data(3000).unwrap();
        assert_eq!(w.consume(1_000_000), Some(3000));
        assert_eq!(w.consume(1_000_000), None);
    }

    #[test]
    fn sender_and_receiver_never_deadlock() {
        // Model: a sender with a backlog of varied sizes, a receiver consuming everything.
        let window = 8192;
        let max_frame = 65536;
        let mut send = SendCredit::new(window);
        let mut recv = RecvWindow::new(window, max_frame);
        let sizes = [10usize, 5000, 70, 65536, 1, 9000, 4096, 300];
        let mut in_flight = Vec::new();
        let mut sent = 0;
        for round in 0..10_000 {
            let body = sizes[round % sizes.len()];
            if send.can_send() {
                send.spend(data_cost(body));
                in_flight.push(data_cost(body));
                sent += 1;
            }
            assert!(!in_flight.is_empty(), "deadlock at round {round}");
            let cost = in_flight.remove(0);
            recv.handle_data(cost).unwrap();
            if let Some(grant) = recv.consume(cost) {
                send.handle_grant(grant);
            }
        }
        assert!(sent > 1000);
    }
}
