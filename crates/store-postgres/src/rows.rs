//! Rows of `records`, and the outcome rows of the transition functions, read into the domain's
//! types and written from them.

use std::time::Duration;

use idempotency_core::domain::{
    ApiResponse, FencingToken, Fingerprint, Lease, LeaseToken, Owner, Record, RecordState, Rejection, RequestId,
    Timestamp,
};
use idempotency_core::store::StoreError;
use tokio_postgres::Row;

use crate::codes::{OutcomeCode, StateCode};

/// A record's state-dependent columns, as `records` stores them.
pub(crate) struct RecordColumns {
    pub(crate) fencing_token: i64,
    pub(crate) retention_ms: i64,
    pub(crate) state: i16,
    pub(crate) token: uuid::Uuid,
    pub(crate) lease_expires_at: Option<i64>,
    pub(crate) request_id: Option<String>,
    pub(crate) takeover: bool,
    pub(crate) response: Option<Vec<u8>>,
    pub(crate) completed_at: Option<i64>,
}

impl RecordColumns {
    pub(crate) fn of(record: &Record) -> Self {
        let (state, token, lease_expires_at, request_id, takeover, response, completed_at) = match &record.state {
            RecordState::Held(lease) => (
                StateCode::Held,
                lease.token,
                Some(lease.expires_at.unix_millis()),
                lease.request_id.as_ref().map(|id| id.as_str().to_owned()),
                lease.takeover,
                None,
                None,
            ),
            RecordState::Released { by } => (StateCode::Released, *by, None, None, false, None, None),
            RecordState::Completed { by, response, completed_at } => {
                let response = Some(encode_response(response));
                (StateCode::Completed, *by, None, None, false, response, Some(completed_at.unix_millis()))
            }
        };
        RecordColumns {
            fencing_token: i64::try_from(record.fencing_token.0).unwrap_or(i64::MAX),
            retention_ms: i64::try_from(record.retention_millis).unwrap_or(i64::MAX),
            state: state as i16,
            token: token.as_uuid(),
            lease_expires_at,
            request_id,
            takeover,
            response,
            completed_at,
        }
    }
}

/// A transition function's `outcome` row.
pub(crate) struct Outcome<'a>(pub(crate) &'a Row);

impl Outcome<'_> {
    pub(crate) fn code(&self) -> Result<OutcomeCode, StoreError> {
        let code: i16 = self.0.get("code");
        OutcomeCode::from_sql(code).ok_or_else(|| corrupt(&format!("the unknown outcome code {code}")))
    }
    pub(crate) fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.0.get("now_ms"))
    }
    pub(crate) fn time(&self, column: &str) -> Result<Timestamp, StoreError> {
        self.0.get::<_, Option<i64>>(column).map(Timestamp::from_unix_millis).ok_or_else(|| corrupt(column))
    }
    pub(crate) fn fencing_token(&self) -> Result<FencingToken, StoreError> {
        let token: Option<i64> = self.0.get("fencing_token");
        token.and_then(|token| u64::try_from(token).ok()).map(FencingToken).ok_or_else(|| corrupt("no fencing token"))
    }
    pub(crate) fn attempt(&self) -> Result<u32, StoreError> {
        let attempt: Option<i64> = self.0.get("attempt");
        attempt.and_then(|attempt| u32::try_from(attempt).ok()).ok_or_else(|| corrupt("no attempt"))
    }
    pub(crate) fn owner(&self) -> Result<Owner, StoreError> {
        let owner: Option<&str> = self.0.get("owner");
        owner.and_then(|owner| Owner::parse(owner).ok()).ok_or_else(|| corrupt("no owner"))
    }
    pub(crate) fn token(&self) -> Result<LeaseToken, StoreError> {
        let token: Option<uuid::Uuid> = self.0.get("token");
        token.map(LeaseToken::from_uuid).ok_or_else(|| corrupt("no lease token"))
    }
    pub(crate) fn response(&self) -> Result<ApiResponse, StoreError> {
        let bytes: Option<&[u8]> = self.0.get("response");
        decode_response(bytes.ok_or_else(|| corrupt("no response"))?)
    }
    /// The refusal the outcome stands for, if it is one.
    pub(crate) fn rejection(&self) -> Option<StoreError> {
        match self.code() {
            Ok(OutcomeCode::FingerprintMismatch) => Some(Rejection::FingerprintMismatch.into()),
            Ok(OutcomeCode::LeaseLost) => Some(Rejection::LeaseLost.into()),
            Ok(OutcomeCode::AlreadyCompleted) => Some(Rejection::AlreadyCompleted.into()),
            Ok(OutcomeCode::NotFound) => Some(Rejection::NotFound.into()),
            Ok(
                OutcomeCode::Done
                | OutcomeCode::InProgress
                | OutcomeCode::Completed
                | OutcomeCode::AlreadyCompletedByThisToken
                | OutcomeCode::StoreFull
                | OutcomeCode::NamespaceFull,
            ) => None,
            Err(error) => Some(error),
        }
    }
}

/// The first byte of a stored response, so that its layout can change later.
pub(crate) const RESPONSE_ENCODING_VERSION: u8 = 1;

/// A response as stored in the `response` column (opaque to SQL).
pub(crate) fn encode_response(response: &ApiResponse) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(response.size() + 16);
    bytes.push(RESPONSE_ENCODING_VERSION);
    postcard::to_io(response, &mut bytes).expect("a response always encodes");
    bytes
}

pub(crate) fn decode_response(bytes: &[u8]) -> Result<ApiResponse, StoreError> {
    match bytes.split_first() {
        Some((&RESPONSE_ENCODING_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|error| StoreError::Corrupt(format!("undecodable response: {error}")))
        }
        _ => Err(StoreError::Corrupt("a response of unknown encoding".to_owned())),
    }
}

pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Reads a row of `records` (the columns of the table) into the domain's record.
pub(crate) fn record_from_row(row: &Row) -> Result<Record, StoreError> {
    let token = LeaseToken::from_uuid(row.try_get("token").map_err(|_| corrupt("a record without token"))?);
    let time = |column: &str| -> Result<Timestamp, StoreError> {
        let value: Option<i64> = row.get(column);
        value.map(Timestamp::from_unix_millis).ok_or_else(|| corrupt(column))
    };
    let state: i16 = row.get("state");
    let state = match StateCode::from_sql(state).ok_or_else(|| corrupt("an unknown record state"))? {
        StateCode::Held => {
            let request_id: Option<&str> = row.get("request_id");
            RecordState::Held(Lease {
                token,
                expires_at: time("lease_expires_at")?,
                request_id: RequestId::parse_optional(request_id.unwrap_or(""))
                    .map_err(|_| corrupt("an invalid request id"))?,
                takeover: row.get("takeover"),
            })
        }
        StateCode::Released => RecordState::Released { by: token },
        StateCode::Completed => {
            let response: Option<&[u8]> = row.get("response");
            RecordState::Completed {
                by: token,
                response: decode_response(response.ok_or_else(|| corrupt("a completed record without response"))?)?,
                completed_at: time("completed_at")?,
            }
        }
    };
    let fingerprint: &[u8] = row.get("fingerprint");
    let owner: &str = row.get("owner");
    let fencing_token: i64 = row.get("fencing_token");
    let attempt: i64 = row.get("attempt");
    let retention_ms: i64 = row.get("retention_ms");
    Ok(Record {
        fingerprint: Fingerprint::parse(fingerprint).map_err(|_| corrupt("an invalid fingerprint"))?,
        fencing_token: FencingToken(u64::try_from(fencing_token).map_err(|_| corrupt("a negative fencing token"))?),
        attempt: u32::try_from(attempt).map_err(|_| corrupt("an attempt out of range"))?,
        owner: Owner::parse(owner).map_err(|_| corrupt("an invalid owner"))?,
        retention_millis: u64::try_from(retention_ms).map_err(|_| corrupt("a negative retention"))?,
        updated_at: time("updated_at")?,
        state,
    })
}

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("PostgreSQL returned {what}"))
}
