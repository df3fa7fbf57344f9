//! The domain: validated values, the stored record, and the pure key state machine. Nothing here
//! does I/O, reads a clock or knows about gRPC or storage engines; time is passed in.

pub mod machine;
pub mod record;
pub mod values;

pub use machine::{
    Claim, ClaimOutcome, Complete, CompleteOutcome, Grant, KeyState, KeyView, Rejection, Release, Renew, RenewOutcome,
    Replay, Transition,
};
pub use record::{Lease, Record, RecordState};
pub use values::{
    ApiResponse, FencingToken, Fingerprint, InvalidInput, Key, LeaseToken, Limits, Namespace, Owner, RequestId,
    Timestamp,
};
