//! Safety under faults, checked on recorded histories (see the testkit's `history` for P1–P5),
//! one file per subject: backups of a running server; the checker's own tests on known-bad
//! histories; crashes, races and
//! pauses; the reference model of both stores; hostile input; load, memory and disk; replicas on
//! PostgreSQL; a disk that fills up; and the differential test of the state machine against its
//! SQL copy.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotency_proto::pb;
use idempotency_proto::pb::coordinator_client::CoordinatorClient;
use idempotency_testkit::Rng;
use idempotency_testkit::history::{self, Call, Event, History, Outcome};
use idempotency_testkit::*;
use tonic::transport::Channel;
use tonic_types::StatusExt;

mod backup;
mod checker;
mod crashes;
mod differential;
mod disk;
mod hostile;
mod load;
mod model;
mod power;
mod recording;
mod replicas;

use hostile::{frame, rss_kib};
use recording::*;
use replicas::*;
