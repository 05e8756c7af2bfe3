//! The pre-threaded server pool.
