//! Server configuration (work in progress).
