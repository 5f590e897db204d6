//! Outgoing handles: turning a message's channel ends, fds and streams into the descriptors of
//! one DATA frame, opening the channels they need. On a session without fds, an fd or stream
//! becomes a PUMPED descriptor and two channels that a pump (`transport::pump`) feeds.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use super::super::chan::{spawn_proxy, InChan, OutChan};
use super::super::direct;
use super::super::pump::Pending;
use crate::channel::{Handle, Inbox, Outlet, PushError, RecvCore, SendCore, DEFAULT_CAPACITY};
use crate::error::Error;
use crate::message::Packet;
use crate::proto::frame::{self, HandleDesc, HandleKind, Pumped, PumpedAs, ResetReason, MAX_FDS};
use crate::proto::handshake::Features;

use super::{Conn, Table};

/// Handles ready to go out with one DATA frame.
pub(crate) struct Exported {
    pub(crate) descs: Vec<HandleDesc>,
    pub(crate) fds: Vec<OwnedFd>,
    /// Channels opened by this frame whose local receiver is already gone: reset them once the
    /// frame is written.
    resets: Vec<u32>,
    /// Relays to start once the frame is written: data on a channel must not overtake the
    /// frame that opens it.
    relays: Vec<(RecvCore, SendCore)>,
    /// Receivers whose inbox this frame makes us relay to the peer, for direct paths: a sender
    /// into one of them exported over another session introduces its holder to the peer.
    relayed: Vec<(std::sync::Weak<Inbox>, std::sync::Weak<OutChan>, u64)>,
    /// Fds and streams that cross as bytes (no fds on this session): their pumps start once
    /// the frame is written, for the same reason as `relays`.
    pumps: Vec<Pending>,
}

/// One handle on its way out: as is, or a sender introduced to a third process (a direct
/// path: the token and our end of the socket pair).
enum Outgoing {
    Handle(Handle),
    Direct {
        token: u32,
        fingerprint: u64,
        sock: OwnedFd,
    },
}

impl Conn {
    /// The id of `outlet` when it is a channel of this session, which the peer receives.
    fn own_outlet(&self, outlet: &Arc<dyn Outlet>) -> Option<u32> {
        let o = outlet.as_any().downcast_ref::<OutChan>()?;
        std::ptr::eq(Arc::as_ptr(&o.conn), self).then_some(o.id)
    }

    /// Whether fds travel as themselves on this session (`FDS` negotiated); otherwise they are
    /// pumped as byte streams (`pump`).
    fn passes_fds(&self) -> bool {
        self.limits.features.contains(Features::FDS)
    }

    /// The session's socket, for a pump to notice the session's end (it is cut when the
    /// session dies).
    pub(crate) fn link_fd(&self) -> BorrowedFd<'_> {
        self.link.fd()
    }

    /// The number of pumped streams running on this session.
    pub(crate) fn pump_count(&self) -> &AtomicU32 {
        &self.pumps
    }

    /// How many new channel ids exporting `h` takes.
    fn ids_needed(&self, h: &Outgoing) -> usize {
        match h {
            Outgoing::Handle(Handle::Sender(SendCore::Remote(o), _))
                if self.own_outlet(o).is_some() =>
            {
                0
            }
            Outgoing::Handle(Handle::Sender(..) | Handle::Receiver(..)) => 1,
            Outgoing::Handle(Handle::Fd(_) | Handle::Stream(_)) if !self.passes_fds() => 2,
            Outgoing::Handle(_) | Outgoing::Direct { .. } => 0,
        }
    }

    /// Turns a message's handles into descriptors and fds for one DATA frame, opening the
    /// channels they need.
    pub(crate) fn export(self: &Arc<Self>, handles: Vec<Handle>) -> Result<Exported, Error> {
        let mut out = Exported {
            descs: Vec::with_capacity(handles.len()),
            fds: Vec::new(),
            resets: Vec::new(),
            relays: Vec::new(),
            relayed: Vec::new(),
            pumps: Vec::new(),
        };
        if handles.is_empty() {
            return Ok(out);
        }
        let handles = self.introduce_direct(handles);
        // Before the table's lock: rings the peer closed unseen come back among the offers
        // a `Sender` below may bind.
        self.look_for_closes();
        let mut t = self.lock_table();
        // Every id first: once a handle is taken apart it cannot be given back, and dropping
        // one under the table's lock could re-enter it (a channel end closing).
        let needed: usize = handles.iter().map(|h| self.ids_needed(h)).sum();
        let mut ids = Vec::with_capacity(needed);
        for _ in 0..needed {
            match t.ids.next() {
                Some(id) => ids.push(id),
                None => {
                    drop(t);
                    return Err(Error::Protocol("channel ids exhausted".into()));
                }
            }
        }
        let mut ids = ids.into_iter();
        let mut id = move || ids.next().expect("ids_needed counted every id taken below");
        let mut proxies = Vec::new();
        let mut lanes = Vec::new();
        for h in handles {
            let h = match h {
                Outgoing::Handle(h) => h,
                Outgoing::Direct {
                    token,
                    fingerprint,
                    sock,
                } => {
                    out.fds.push(sock);
                    out.descs.push(HandleDesc {
                        kind: HandleKind::SenderDirect,
                        chan: token,
                        fingerprint,
                        offer: 0,
                    });
                    continue;
                }
            };
            // A sender into a channel the peer receives on this very session.
            let back_to_peer = match &h {
                Handle::Sender(SendCore::Remote(o), _) => self.own_outlet(o),
                _ => None,
            };
            let desc = match h {
                Handle::Fd(fd) if !self.passes_fds() => {
                    self.export_pumped(&mut t, fd, PumpedAs::Fd, [id(), id()], &mut out.pumps)
                }
                Handle::Stream(fd) if !self.passes_fds() => {
                    let ids = [id(), id()];
                    self.export_pumped(&mut t, fd, PumpedAs::Stream, ids, &mut out.pumps)
                }
                Handle::Fd(fd) => {
                    out.fds.push(fd);
                    HandleDesc::fd()
                }
                Handle::Stream(fd) => {
                    out.fds.push(fd);
                    HandleDesc {
                        kind: HandleKind::Stream,
                        chan: 0,
                        fingerprint: 0,
                        offer: 0,
                    }
                }
                Handle::Sender(_, fp) if back_to_peer.is_some() => {
                    // The peer receives this channel: give it a sender into its own inbox.
                    HandleDesc {
                        kind: HandleKind::SenderLocal,
                        chan: back_to_peer.unwrap_or_default(),
                        fingerprint: fp,
                        offer: 0,
                    }
                }
                Handle::Sender(core, fp) => {
                    let id = id();
                    let inbox = match core {
                        SendCore::Local(ref inbox) if !inbox.fed_by_other(&**self) => inbox.clone(),
                        // An inbox reads at most one session itself; a second session, or
                        // a sender into another session, goes through a relay.
                        SendCore::Local(_) | SendCore::Remote(_) => {
                            // A sender into another session: relay through a local inbox.
                            let inbox = Inbox::new(DEFAULT_CAPACITY);
                            proxies.push((RecvCore::new(inbox.clone()), core.clone()));
                            inbox
                        }
                    };
                    let mut offer = 0;
                    if inbox.add_feed(self.clone()) {
                        let c = InChan::new(self, id, inbox);
                        // A ring the peer offered becomes the channel's: the peer's first
                        // message on it needs no RING frame, and the lane is read from now.
                        if let Some((offered, ring)) = self.bind_offer() {
                            if c.ring.set(ring.clone()).is_ok() {
                                self.track_bound_offer(id, offered, &ring);
                                lanes.push((c.inbox.clone(), ring));
                                offer = offered;
                            }
                        }
                        t.inbound.insert(id, c);
                    } else {
                        t.reset_inbound.insert(id);
                        out.resets.push(id);
                    }
                    HandleDesc {
                        kind: if offer == 0 {
                            HandleKind::Sender
                        } else {
                            HandleKind::SenderRing
                        },
                        chan: id,
                        fingerprint: fp,
                        offer,
                    }
                }
                Handle::Receiver(core, fp) => {
                    let id = id();
                    let o = OutChan::new(self.clone(), id);
                    t.outbound.insert(id, Arc::downgrade(&o));
                    if self.shm() {
                        out.relayed
                            .push((Arc::downgrade(&core.0), Arc::downgrade(&o), fp));
                    }
                    proxies.push((core, SendCore::Remote(o)));
                    HandleDesc {
                        kind: HandleKind::Receiver,
                        chan: id,
                        fingerprint: fp,
                        offer: 0,
                    }
                }
            };
            out.descs.push(desc);
        }
        drop(t);
        // Before the frame naming them is written: the peer may send on them at once.
        for (inbox, ring) in lanes {
            inbox.add_lane(ring);
        }
        out.relays = proxies;
        Ok(out)
    }
    /// Opens the two channels of a pumped stream of `fd`: `to_reader` we send its bytes on,
    /// `to_writer` we receive the bytes for it on. Its pump starts once the frame is written.
    fn export_pumped(
        self: &Arc<Self>,
        t: &mut Table,
        fd: OwnedFd,
        kind: PumpedAs,
        [to_reader, to_writer]: [u32; 2],
        pumps: &mut Vec<Pending>,
    ) -> HandleDesc {
        let o = OutChan::new(self.clone(), to_reader);
        t.outbound.insert(to_reader, Arc::downgrade(&o));
        // Credit bounds what a session pushes into an inbox, not its capacity.
        let inbox = Inbox::new(1);
        let rx = RecvCore::new(inbox.clone());
        // A new inbox has its receiver (`rx`): the feed is always taken.
        inbox.add_feed(self.clone());
        t.inbound
            .insert(to_writer, InChan::new(self, to_writer, inbox));
        pumps.push(Pending::new(fd, o, rx));
        HandleDesc::pumped(Pumped {
            to_reader,
            to_writer,
            kind,
        })
    }

    /// Writes one DATA frame for `packet` on channel `id` (see `write_frame` for `abort`).
    pub(crate) fn send_data(
        self: &Arc<Self>,
        id: u32,
        packet: Packet,
        abort: &dyn Fn() -> bool,
    ) -> Result<(), PushError> {
        let Packet { bytes, handles } = packet;
        let exported = self.export(handles).map_err(|_| PushError::Disconnected)?;
        let nfds = exported.fds.len() as u16;
        let mut head = Vec::with_capacity(16 + 16 * exported.descs.len());
        frame::encode_data(&mut head, id, &exported.descs, bytes.len(), nfds);
        let fds: Vec<BorrowedFd<'_>> = exported.fds.iter().map(|f| f.as_fd()).collect();
        self.write_frame(&[&head, &bytes], &fds, abort)?;
        // Only now may an INTRO name these channels: the peer knows them.
        for (inbox, out, fp) in exported.relayed {
            direct::mark_relayed(inbox, out, fp);
        }
        for (rx, tx) in exported.relays {
            spawn_proxy(rx, tx);
        }
        for p in exported.pumps {
            p.start();
        }
        for id in exported.resets {
            let mut buf = Vec::new();
            frame::encode_reset(&mut buf, id, ResetReason::ReceiverGone, "receiver dropped");
            self.send_control(&buf);
        }
        Ok(())
    }
}

// Direct paths (ARCHITECTURE.md section 2.26).
impl Conn {
    /// Replaces each sender into an inbox we relay to a process on another shared-memory
    /// session by an introduction to that process (a direct path), when this session has
    /// shared memory too and the frame has room for the socket; other handles pass as they
    /// are.
    fn introduce_direct(self: &Arc<Self>, handles: Vec<Handle>) -> Vec<Outgoing> {
        let fd_handles = |hs: &[Handle]| {
            hs.iter()
                .filter(|h| matches!(h, Handle::Fd(_) | Handle::Stream(_)))
                .count()
        };
        let mut room = usize::from(MAX_FDS).saturating_sub(fd_handles(&handles));
        let mut introduced = Vec::new();
        let out = handles
            .into_iter()
            .map(|h| {
                let direct = match &h {
                    Handle::Sender(SendCore::Local(inbox), fp) if self.shm() && room > 0 => {
                        direct::relayed_to(inbox, *fp, self)
                            .and_then(|relay| direct::introduce(&relay, *fp))
                            .map(|(token, sock)| (token, *fp, sock))
                    }
                    _ => None,
                };
                match direct {
                    Some((token, fingerprint, sock)) => {
                        room -= 1;
                        introduced.push(h);
                        Outgoing::Direct {
                            token,
                            fingerprint,
                            sock,
                        }
                    }
                    None => Outgoing::Handle(h),
                }
            })
            .collect();
        // The INTROs are written: the receiving process holds each channel open until its new
        // sender joins, so our own senders may go (no lock is held here).
        drop(introduced);
        out
    }

    /// Introduces a new sender of channel `id` (which we send on) to the peer: an INTRO frame
    /// carrying `sock`, the receiving end of the direct session.
    pub(crate) fn send_intro(
        self: &Arc<Self>,
        id: u32,
        token: u32,
        fingerprint: u64,
        sock: OwnedFd,
    ) -> Result<(), PushError> {
        let mut buf = Vec::with_capacity(24);
        frame::encode_intro(&mut buf, id, token, fingerprint);
        self.write_frame(&[&buf], &[sock.as_fd()], &|| false)
    }

    /// Opens a channel we send on as one more sender of the channel the peer was introduced
    /// to with `token` (a JOIN frame, the first on a direct session).
    pub(crate) fn join(
        self: &Arc<Self>,
        token: u32,
        fingerprint: u64,
    ) -> Result<Arc<OutChan>, Error> {
        self.new_outbound(|buf, id| frame::encode_join(buf, id, token, fingerprint))
    }
}
