//! Running as a service: the systemd notification protocol ([`notify`]: readiness, status, reload, stop, watchdog),
//! the daemon's health as the watchdog and `enforcer status` see it ([`health`]), and the setup checks that name
//! what a host is missing before the capture starts ([`preflight`]). `daemon` calls them; none decides anything.

pub mod health;
pub mod notify;
pub mod preflight;

pub use health::Health;
pub use notify::Notifier;
