//! Types shared by the kernel programs (`enforcer-ebpf`) and the daemon (`enforcer`): the keys and values of the
//! BPF maps, laid out `#[repr(C)]` so both sides agree byte for byte. `no_std`; `aya::Pod` impls live behind the
//! `user` feature so the kernel side never links aya.
#![no_std]
