//! Building server frames: replies, errors, pushes.

use confab_proto::v1::{self, ErrorCode, ServerFrame, server_frame::Kind};

/// An error that has a protocol error code and a message safe to show the client.
pub trait ErrorKind: std::fmt::Display {
    /// The code the client sees.
    fn code(&self) -> ErrorCode;

    /// The text sent to the client; internal details stay in the logs.
    fn client_message(&self) -> String {
        match self.code() {
            ErrorCode::Internal => "internal error".to_owned(),
            _ => self.to_string(),
        }
    }
}

/// An error reply (or, with request id 0, the reason a connection is closed).
pub fn error_frame(request_id: u64, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame {
        request_id,
        kind: Some(Kind::Error(v1::Error {
            code: code as i32,
            message: message.into(),
        })),
    }
}

/// A server push (no request id).
pub fn push_frame(kind: Kind) -> ServerFrame {
    ServerFrame {
        request_id: 0,
        kind: Some(kind),
    }
}
