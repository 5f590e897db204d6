//! The conformance suite (shared/CONFORMANCE.md), written once and run on every transport.
//!
//! Every case is a generic function over [`harness::Transport`]; [`conformance!`] turns each
//! into a `#[test]` named `<transport>::<case>`, e.g. `unix::c01_plain_struct`. Cases are
//! numbered after CONFORMANCE.md. Items 12, 22 (across processes) and 25 need real processes
//! and live in tests/process.rs; this suite has the in-process parts of 22.
//!
//! To add a transport: implement `Transport` in harness.rs and add one `conformance!` line.

mod harness;
mod lifecycle;
mod ported;
mod robust;
mod tls_wire;
mod wire;
mod ws_wire;

/// Instantiates every case for one transport, as `mod $name { #[test] fn <case>() }`.
macro_rules! conformance {
    ($name:ident, $transport:ty) => {
        conformance!(@cases $name, $transport;
            ported::c01_plain_struct,
            ported::c01_zero_and_large_payloads,
            ported::c02_request_reply,
            ported::c03_sender_receiver_stream_at_once,
            ported::c04_nesting_three_levels,
            ported::c04_receiver_sent_with_queued_messages,
            ported::c04_receiver_waiting_before_its_sender_is_sent,
            ported::c05_sender_of_senders,
            ported::c06_copy_proxies_replies,
            ported::c07_stream_through_copy,
            ported::c08_fd_bound_to_its_message,
            ported::c09_socket_fd_talks,
            ported::c10_fifty_channels_interleaved,
            ported::c11_late_rendezvous,
            lifecycle::c13_isolation_from_a_full_channel,
            lifecycle::c14_blocked_calls_wake_on_close,
            lifecycle::c14_accept_fails_after_peer_closes,
            lifecycle::c15_nested_channel_in_last_message,
            lifecycle::c16_send_after_receiver_gone,
            lifecycle::c16_nested_sender_after_receiver_gone,
            lifecycle::c16_send_after_session_close,
            lifecycle::c17_closing_twice,
            lifecycle::c22_unread_handles_are_closed,
            lifecycle::c22_tables_shrink,
            lifecycle::c24_graceful_close_delivers_all,
            lifecycle::c24_close_while_receiving_delivers_all,
            lifecycle::c24_close_before_accept_delivers,
            robust::c18_invalid_message_then_next,
            robust::c18_invalid_archive_from_the_wire,
            robust::c19_field_types_round_trip,
            robust::c20_thousand_messages_two_handles,
            robust::c21_unaccepted_channel_does_not_block,
            robust::c23_large_message,
            robust::c23_too_large_refused_at_send,
            robust::c23_oversized_data_closes_peer_session,
            robust::c23_oversized_header_rejected_at_once,
            robust::c23_limit_violation_goaway_reason,
            robust::c26_try_send_fills_then_drains,
            robust::c26_blocking_send_waits_for_receiver,
            robust::c27_loans_arrive_in_order,
            robust::c28_held_messages_do_not_stall_the_sender,
            robust::c29_receiving_threads_share_a_channel,
        );
    };
    (@cases $name:ident, $transport:ty;
        $($(#[$attr:meta])* $module:ident :: $case:ident),* $(,)?) => {
        mod $name {
            $(
                $(#[$attr])*
                #[test]
                fn $case() {
                    crate::harness::watchdog(
                        concat!(stringify!($name), "::", stringify!($case)),
                        crate::$module::$case::<$transport>,
                    );
                }
            )*
        }
    };
}

conformance!(mem, crate::harness::MemT);
conformance!(unix, crate::harness::UnixT);
conformance!(tcp, crate::harness::TcpT);
conformance!(tls, crate::tls_wire::TlsT);
conformance!(ws, crate::ws_wire::WsT);
conformance!(ws_nginx, crate::ws_wire::WsNginxT);
conformance!(tcp_upgraded, crate::harness::UpgradedT);
conformance!(shm, crate::harness::ShmT);
