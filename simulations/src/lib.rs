//! The simulated world: a discrete-event engine that drives the real state machines of `actors`.
//! Not built yet; a later issue fills it.
