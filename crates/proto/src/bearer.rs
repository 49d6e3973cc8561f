//! `authorization: Bearer <token>` on every call: the one interceptor Keywarden's own
//! clients (the admin CLI, the edge library, the benchmark) present their caller token
//! with.

use tonic::metadata::errors::InvalidMetadataValue;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    /// Marked sensitive: never logged, and never put in HPACK's table, so it is sent whole
    /// with every call. For tokens that must not linger anywhere (the CLI's, the edge
    /// library's).
    pub fn sensitive(token: &str) -> Result<Bearer, InvalidMetadataValue> {
        let mut bearer = Bearer::indexed(token)?;
        bearer.0.set_sensitive(true);
        Ok(bearer)
    }

    /// Indexed by HPACK after the first call, as most gRPC clients and h2load send it
    /// (the benchmark's, and the tests').
    pub fn indexed(token: &str) -> Result<Bearer, InvalidMetadataValue> {
        Ok(Bearer(format!("Bearer {token}").parse()?))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn every_call_carries_the_token() {
        for mut bearer in [
            Bearer::indexed("t0k").unwrap(),
            Bearer::sensitive("t0k").unwrap(),
        ] {
            let request = bearer.call(Request::new(())).unwrap();
            assert_eq!(
                request.metadata().get("authorization").unwrap(),
                "Bearer t0k"
            );
        }
        assert!(Bearer::sensitive("t0k").unwrap().0.is_sensitive());
        assert!(!Bearer::indexed("t0k").unwrap().0.is_sensitive());
        assert!(Bearer::sensitive("bad\ntoken").is_err());
    }
}
