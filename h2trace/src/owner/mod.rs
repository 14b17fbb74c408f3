//! Who owns a connection: the kernel learns owners from process-context events; sockets that
//! predate h2trace are found at start (`snapshot`) and their owners read from /proc.
pub mod cgroup;
pub mod exits;
pub mod snapshot;
