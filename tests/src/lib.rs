//! Shared harness for the cross-runtime suite.
