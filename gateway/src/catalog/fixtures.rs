//! Imported services for the unit tests of the rooms that read the route
//! table: one endpoint on loopback, one SAN, one HTTP instance `gw`; a
//! test changes what it is about.

use std::sync::Arc;

use elsinore_federation_api::{Endpoint, FederatedService, Instance, Protocol};

pub(crate) fn service(name: &str, fqdn: &str) -> FederatedService {
    FederatedService {
        name: name.into(),
        description: String::new(),
        tags: vec![],
        labels: Default::default(),
        fqdn: fqdn.into(),
        endpoints: vec![Endpoint {
            address: "127.0.0.1".into(),
            port: 15443,
            labels: vec![],
            description: String::new(),
        }],
        sans: vec!["spiffe://a/x".into()],
        instances: vec![Instance {
            id: "gw".into(),
            protocol: Protocol::Http,
            metadata: Default::default(),
            endpoint_selector: vec![],
            description: String::new(),
        }],
    }
}

/// [`service`] whose instance is `instance` and names `port` in its `PORT`.
pub(crate) fn service_on(
    name: &str,
    fqdn: &str,
    instance: &str,
    port: u16,
) -> Arc<FederatedService> {
    let mut s = service(name, fqdn);
    s.instances[0].id = instance.into();
    s.instances[0]
        .metadata
        .insert("PORT".to_owned(), port.to_string());
    Arc::new(s)
}
