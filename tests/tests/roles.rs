//! The network roles over mutual TLS: the real `mcim-roles` binary, certificates from
//! `mcimctl pki init`, and the authorization table deciding each call by the caller's
//! certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcim_e2e::{Swtpm, workspace_bin};
use mcim_proto::mcim::common::v1 as common;
use mcim_proto::mcim::supplier::v1 as pb;
use mcim_proto::mcim::supplier::v1::supplier_service_client::SupplierServiceClient;
use mcim_roles::authz::Role;
use mcim_tre::tre::Tre;
use tonic::transport::{Channel, Endpoint};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn client(
    pki: &std::path::Path,
    as_role: Role,
    port: u16,
) -> Result<SupplierServiceClient<Channel>, String> {
    let tls = mcim_roles::tls::client_tls(pki, as_role, Role::Supplier).unwrap();
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(SupplierServiceClient::new(ch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supplier_certifies_a_real_device_and_the_table_decides_who_may_ask() {
    let work = tempfile::tempdir().unwrap();
    let pki = mcim_e2e::pki_init(work.path());
    let (_server, port) = start_role("supplier", &pki);

    // A real device's public material (swtpm).
    let tpm = Swtpm::start();
    let public = {
        let mut t =
            mcim_tre::tre::tpm::TpmTre::open(&mcim_tre::tre::tpm::TpmConfig { tcti: tpm.tcti() })
                .unwrap();
        t.init_device(
            &mcim_core::identity::DeviceIdentity::new(
                "SN-R",
                mcim_core::identity::Pcid::new("001010000000123").unwrap(),
                "m",
            )
            .unwrap(),
        )
        .unwrap()
        .public
    };
    let request = |ak: Vec<u8>| pb::CertifyDeviceRequest {
        identity: Some(common::DeviceIdentity {
            device_id: "SN-R".into(),
            pcid: "001010000000123".into(),
            model: "m".into(),
        }),
        tre_kind: common::TreKind::Tpm2 as i32,
        storage_public: public.storage_public.clone(),
        attestation_public: ak,
        tls_public_spki: public.tls_public_spki.clone(),
    };

    // Anyone authenticated may read the supplier root; only the supplier certifies.
    let mut sho = client(&pki, Role::Sho, port).await.unwrap();
    let root = sho
        .get_supplier_root(pb::GetSupplierRootRequest {})
        .await
        .unwrap()
        .into_inner()
        .certificate;
    assert!(!root.is_empty());
    let denied = sho
        .certify_device(request(public.attestation_public.clone()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");

    let mut supplier = client(&pki, Role::Supplier, port).await.unwrap();
    let r = supplier
        .certify_device(request(public.attestation_public.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.platform_credential.len(), 2);
    assert_eq!(
        r.platform_credential[1], root,
        "the chain ends at the supplier root"
    );
    // The TLS certificate names the device and carries the key its TPM holds.
    let caller = mcim_pki::party::caller_from_cert(&r.tls_certificate[0]).unwrap();
    assert_eq!(
        (caller.role, caller.name.as_str()),
        (Role::Device, "001010000000123")
    );
    assert!(
        r.tls_certificate[0]
            .windows(65)
            .any(|w| w == &public.tls_public_spki[26..])
    );
    // The AK certificate carries the AK's point.
    let ak = mcim_core::tpm::public::EccPublic::from_tpm2b(&public.attestation_public).unwrap();
    assert!(r.platform_credential[0].windows(32).any(|w| w == ak.x));
    // Certified by the supplier root.
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, leaf) = X509Certificate::from_der(&r.platform_credential[0]).unwrap();
    let (_, ca) = X509Certificate::from_der(&root).unwrap();
    assert!(leaf.verify_signature(Some(ca.public_key())).is_ok());

    // An "attestation key" that is not a restricted signing key is refused: the storage key.
    let refused = supplier
        .certify_device(request(public.storage_public.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    // Nor is a storage key nothing can be wrapped to, nor a TLS key off the curve (found by
    // an outside attack: both were certified under the supplier root).
    let mut bad_storage = request(public.attestation_public.clone());
    bad_storage.storage_public = vec![1, 2, 3];
    let refused = supplier.certify_device(bad_storage).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("storage key"), "{refused}");
    let mut off_curve = request(public.attestation_public.clone());
    let last = off_curve.tls_public_spki.len() - 1;
    off_curve.tls_public_spki[last] ^= 1;
    let refused = supplier.certify_device(off_curve).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("TLS key"), "{refused}");

    // gRPC health and reflection answer (over the same mutual TLS).
    let tls = mcim_roles::tls::client_tls(&pki, Role::Sho, Role::Supplier).unwrap();
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "mcim.supplier.v1.SupplierService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1 as refl;
    let mut stream = refl::server_reflection_client::ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![refl::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                refl::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        }]))
        .await
        .unwrap()
        .into_inner();
    let listed = stream.message().await.unwrap().unwrap();
    let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        listed.message_response
    else {
        panic!("no service list");
    };
    assert!(
        l.service
            .iter()
            .any(|s| s.name == "mcim.supplier.v1.SupplierService"),
        "{:?}",
        l.service
    );

    // Without a client certificate there is no connection at all.
    let bare = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(pki.join("ca.pem")).unwrap(),
        ))
        .domain_name("supplier.mcim.local");
    let ch = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(bare)
        .unwrap();
    let refused = match ch.connect().await {
        Err(_) => true,
        Ok(ch) => SupplierServiceClient::new(ch)
            .get_supplier_root(pb::GetSupplierRootRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
}

/// A gRPC channel whose client TLS key is the device's TRE key (the device side of mutual TLS):
/// `mcim_tre::tls::device_client_config` under tonic, through a custom connector (tonic's own
/// TLS settings cannot take a signing key that lives in a TRE).
async fn device_channel(
    pki: &std::path::Path,
    port: u16,
    server_name: &'static str,
    chain: Vec<Vec<u8>>,
    sign: std::sync::Arc<mcim_tre::tls::TreSignFn>,
) -> Channel {
    let config = mcim_tre::tls::device_client_config(
        &std::fs::read(pki.join("ca.pem")).unwrap(),
        chain,
        mcim_tre::tls::TreTlsKey::new(sign),
    )
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = rustls::pki_types::ServerName::try_from(server_name).unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

/// One role on a free port of its own (again on another port if the one found free was taken
/// before the role bound it).
fn start_role(role: &str, pki: &std::path::Path) -> (Server, u16) {
    for _attempt in 0..5 {
        let port = mcim_e2e::free_ports(1);
        let mut extra = Vec::new();
        if role == "pva" {
            extra = vec![
                "--db".to_string(),
                format!("sqlite://{}", pki.join("pva.db").display()),
            ];
        }
        let child = Command::new(workspace_bin("mcim-roles"))
            .args([
                role,
                "--pki",
                pki.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Server(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (server, port);
            }
            if server.0.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("mcim-roles {role} did not listen");
}

/// Steps 8-10 with a real TPM: the SHO asks the PVA to validate a device; the device, over
/// its TPM-held TLS identity, submits a quote of the PVA's nonce; the PVA checks the platform
/// credential, the quote and the reference PCRs and signs a trusted result. A reference that
/// differs makes the next validation untrusted; the SHO cannot submit evidence in the
/// device's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pva_validates_a_real_tpm_device_over_its_own_tls_key() {
    use mcim_proto::mcim::pva::v1 as pva;
    use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
    use mcim_tre::engine::{Engine, EngineHandle};

    let work = tempfile::tempdir().unwrap();
    let pki = mcim_e2e::pki_init(work.path());
    let (_supplier, sport) = start_role("supplier", &pki);
    let (pva_server, pport) = start_role("pva", &pki);

    // The device: a TPM behind the TRE thread, as in tred.
    let tpm = Swtpm::start();
    let tcti = tpm.tcti();
    let state = work.path().join("tred");
    let (engine, _t) = EngineHandle::spawn(move || {
        let t = mcim_tre::tre::tpm::TpmTre::open(&mcim_tre::tre::tpm::TpmConfig { tcti }).unwrap();
        Engine::new(Box::new(t), state).map_err(|e| e.to_string())
    })
    .unwrap();
    let identity = mcim_core::identity::DeviceIdentity::new(
        "SN-P",
        mcim_core::identity::Pcid::new("001010000000321").unwrap(),
        "meter-v3",
    )
    .unwrap();
    let public = engine
        .call_blocking(move |e| e.init_device(&identity).map(|o| o.public))
        .unwrap()
        .unwrap();
    let pcrs = mcim_core::tpm::policy::PcrSelection::sha256(&[0, 1, 2, 7]).unwrap();
    let quote = {
        let engine = engine.clone();
        let pcrs = pcrs.clone();
        move |nonce: Vec<u8>| {
            let pcrs = pcrs.clone();
            engine
                .call_blocking(move |e| e.tre().unwrap().quote(&nonce, &pcrs))
                .unwrap()
                .unwrap()
        }
    };

    // Supplier: certify the device and register the model's reference values (today's PCRs).
    let mut supplier = client(&pki, Role::Supplier, sport).await.unwrap();
    let cert = supplier
        .certify_device(pb::CertifyDeviceRequest {
            identity: Some(common::DeviceIdentity {
                device_id: "SN-P".into(),
                pcid: "001010000000321".into(),
                model: "meter-v3".into(),
            }),
            tre_kind: common::TreKind::Tpm2 as i32,
            storage_public: public.storage_public.clone(),
            attestation_public: public.attestation_public.clone(),
            tls_public_spki: public.tls_public_spki.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let today = quote(vec![1; 16]);
    let reference = |values: &[[u8; 32]]| pva::RegisterReferenceValuesRequest {
        model: "meter-v3".into(),
        pcr_bank: "sha256".into(),
        pcrs: today
            .pcrs
            .iter()
            .zip(values)
            .map(|(i, v)| common::PcrValue {
                index: u32::from(*i),
                digest: v.to_vec(),
            })
            .collect(),
        allow_pkcs11: false,
        pkcs11_measurement: Vec::new(),
    };
    let pva_as = |role| {
        let pki = pki.clone();
        async move {
            let tls = mcim_roles::tls::client_tls(&pki, role, Role::Pva).unwrap();
            PvaServiceClient::new(
                Endpoint::from_shared(format!("https://127.0.0.1:{pport}"))
                    .unwrap()
                    .tls_config(tls)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            )
        }
    };
    pva_as(Role::Supplier)
        .await
        .register_reference_values(reference(&today.pcr_values))
        .await
        .unwrap();

    // SHO asks; the device answers over its TPM-held TLS key.
    let mut sho = pva_as(Role::Sho).await;
    let asked = sho
        .request_validation(pva::RequestValidationRequest {
            pcid: "001010000000321".into(),
            registration_id: "r1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let sign = engine.tls_signer();
    let mut device = PvaServiceClient::new(
        device_channel(
            &pki,
            pport,
            "pva.mcim.local",
            cert.tls_certificate.clone(),
            sign,
        )
        .await,
    );
    let evidence = |q: mcim_core::tpm::attest::TpmQuote| common::Evidence {
        kind: Some(common::evidence::Kind::TpmQuote(common::TpmQuote {
            attest: q.attest,
            signature: q.signature,
            pcrs: q
                .pcrs
                .iter()
                .zip(&q.pcr_values)
                .map(|(i, v)| common::PcrValue {
                    index: u32::from(*i),
                    digest: v.to_vec(),
                })
                .collect(),
            pcr_bank: "sha256".into(),
        })),
        aka_execution: common::AkaExecution::InTre as i32,
        platform_credential: cert.platform_credential.clone(),
    };
    let submit = |id: String, ev| pva::SubmitEvidenceRequest {
        validation_id: id,
        evidence: Some(ev),
        clock: 0,
        reset_count: 0,
        restart_count: 0,
    };
    // The SHO cannot submit in the device's place.
    let denied = sho
        .submit_evidence(submit(
            asked.validation_id.clone(),
            evidence(quote(asked.nonce.clone())),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    // The SHO's long poll, asked while the validation is pending, answers with the verdict
    // the device's evidence brings (not "pending").
    let pending = sho
        .get_validation_result(pva::GetValidationResultRequest {
            validation_id: asked.validation_id.clone(),
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.verdict, pva::Verdict::Pending as i32);
    let long_poll = {
        let mut sho = sho.clone();
        let id = asked.validation_id.clone();
        tokio::spawn(async move {
            sho.get_validation_result(pva::GetValidationResultRequest {
                validation_id: id,
                wait_ms: 30_000,
            })
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !long_poll.is_finished(),
        "the long poll waits while pending"
    );
    let verdict = device
        .submit_evidence(submit(
            asked.validation_id.clone(),
            evidence(quote(asked.nonce.clone())),
        ))
        .await
        .unwrap()
        .into_inner();
    let waited = long_poll.await.unwrap().unwrap().into_inner();
    assert_eq!(waited.verdict, pva::Verdict::Trusted as i32);
    assert_eq!(
        verdict.verdict,
        pva::Verdict::Trusted as i32,
        "{}",
        verdict.reason
    );
    let result = sho
        .get_validation_result(pva::GetValidationResultRequest {
            validation_id: asked.validation_id.clone(),
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let signed = result.result.unwrap();
    // The result verifies with the PVA's key and names the device.
    use coset::CborSerializable;
    let cose = coset::CoseSign1::from_slice(&signed.cose_sign1).unwrap();
    let pva_cert = rustls::pki_types::pem::PemObject::from_pem_slice(
        &std::fs::read(pki.join("pva.pem")).unwrap(),
    )
    .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
    .unwrap();
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, pc) = X509Certificate::from_der(&pva_cert).unwrap();
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&pc.public_key().subject_public_key.data)
        .unwrap();
    cose.verify_signature(&[], |sig, m| {
        use p256::ecdsa::signature::Verifier;
        vk.verify(m, &p256::ecdsa::Signature::from_slice(sig).unwrap())
    })
    .unwrap();
    assert!(String::from_utf8_lossy(cose.payload.as_deref().unwrap()).contains("001010000000321"));

    // A quote of an old nonce is not evidence for a new validation.
    let again = sho
        .request_validation(pva::RequestValidationRequest {
            pcid: "001010000000321".into(),
            registration_id: "r2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let stale = device
        .submit_evidence(submit(
            again.validation_id.clone(),
            evidence(quote(asked.nonce.clone())),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stale.verdict, pva::Verdict::Untrusted as i32);
    assert!(stale.reason.contains("nonce"), "{}", stale.reason);

    // The supplier's reference moves (say a new firmware); this platform no longer matches.
    let mut moved = today.pcr_values.clone();
    moved[3] = [0xee; 32];
    pva_as(Role::Supplier)
        .await
        .register_reference_values(reference(&moved))
        .await
        .unwrap();
    let third = sho
        .request_validation(pva::RequestValidationRequest {
            pcid: "001010000000321".into(),
            registration_id: "r3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let v = device
        .submit_evidence(submit(
            third.validation_id.clone(),
            evidence(quote(third.nonce.clone())),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, pva::Verdict::Untrusted as i32);
    assert!(v.reason.contains("PCR 7 differs"), "{}", v.reason);
    let r = sho
        .get_validation_result(pva::GetValidationResultRequest {
            validation_id: third.validation_id,
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.result.is_none(),
        "no signed result for an untrusted platform"
    );

    // The PVA keeps its state in its database: a validation asked before a restart is
    // decided after it, once.
    pva_as(Role::Supplier)
        .await
        .register_reference_values(reference(&today.pcr_values))
        .await
        .unwrap();
    let fourth = sho
        .request_validation(pva::RequestValidationRequest {
            pcid: "001010000000321".into(),
            registration_id: "r4".into(),
        })
        .await
        .unwrap()
        .into_inner();
    drop(pva_server);
    let (_pva_again, port2) = start_role("pva", &pki);
    let sign2 = engine.tls_signer();
    let mut device2 = PvaServiceClient::new(
        device_channel(
            &pki,
            port2,
            "pva.mcim.local",
            cert.tls_certificate.clone(),
            sign2,
        )
        .await,
    );
    let v = device2
        .submit_evidence(submit(
            fourth.validation_id.clone(),
            evidence(quote(fourth.nonce.clone())),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, pva::Verdict::Trusted as i32, "{}", v.reason);
    let again = device2
        .submit_evidence(submit(
            fourth.validation_id.clone(),
            evidence(quote(fourth.nonce.clone())),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        again.code(),
        tonic::Code::FailedPrecondition,
        "decided once"
    );
}

/// `mcim-roles all`: every role built so far in one process, on one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_roles_in_one_process() {
    use mcim_proto::mcim::pva::v1 as pva;
    use mcim_proto::mcim::pva::v1::pva_service_client::PvaServiceClient;
    let work = tempfile::tempdir().unwrap();
    let roles = mcim_e2e::Roles::start(work.path());
    // Every server answers gRPC health for each of its services (over mutual TLS).
    for (role, services) in [
        (Role::Supplier, &["mcim.supplier.v1.SupplierService"][..]),
        (
            Role::Ro,
            &[
                "mcim.ro.v1.IcfService",
                "mcim.ro.v1.DrfService",
                "mcim.ro.v1.DpfService",
            ][..],
        ),
        (Role::Vno, &["mcim.vno.v1.VnoService"][..]),
        (Role::Sho, &["mcim.sho.v1.ShoService"][..]),
        (Role::Pva, &["mcim.pva.v1.PvaService"][..]),
    ] {
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            roles.channel(Role::Sho, role).await,
        );
        for service in services {
            let h = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: (*service).into(),
                })
                .await
                .unwrap_or_else(|e| panic!("{role} {service}: {e}"))
                .into_inner();
            assert_eq!(
                h.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{role} {service}"
            );
        }
    }
    let mut sup = SupplierServiceClient::new(roles.channel(Role::Sho, Role::Supplier).await);
    assert!(
        !sup.get_supplier_root(pb::GetSupplierRootRequest {})
            .await
            .unwrap()
            .into_inner()
            .certificate
            .is_empty()
    );
    let pva_as = |role| {
        let roles = &roles;
        async move { PvaServiceClient::new(roles.channel(role, Role::Pva).await) }
    };
    let ask = || pva::RequestValidationRequest {
        pcid: "001010000000001".into(),
        registration_id: "r".into(),
    };
    assert_eq!(
        pva_as(Role::Sho)
            .await
            .request_validation(ask())
            .await
            .unwrap()
            .into_inner()
            .nonce
            .len(),
        32
    );
    let denied = pva_as(Role::Supplier)
        .await
        .request_validation(ask())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    // One database: on SQLite one file (the second SHO's beside it), on PostgreSQL one
    // database holding every role's tables.
    if roles.db_url.starts_with("sqlite") {
        assert!(roles.db.exists(), "one SQLite database");
    } else {
        let tables = roles.snapshot().await;
        for t in [
            "auc_subscriber",
            "pva_validation",
            "ro_registration",
            "sho_subscription",
        ] {
            assert!(tables.contains_key(t), "{t}: {tables:?}");
        }
    }
}

/// `mcim-roles --config FILE`: the file's settings apply, and an `MCIM_*` variable wins over
/// the file (the real binary, ports as the witness).
#[test]
fn a_toml_file_configures_the_roles_and_the_environment_wins_over_it() {
    let work = tempfile::tempdir().unwrap();
    let pki = mcim_e2e::pki_init(work.path());
    let from_file = mcim_e2e::free_ports(mcim_e2e::ROLE_PORTS);
    let from_env = loop {
        let p = mcim_e2e::free_ports(mcim_e2e::ROLE_PORTS);
        if p.abs_diff(from_file) >= mcim_e2e::ROLE_PORTS {
            break p;
        }
    };
    let file = work.path().join("mcim-roles.toml");
    std::fs::write(
        &file,
        format!(
            "pki = {:?}\ndb = \"sqlite://{}\"\n[all]\nbase_port = {from_file}\n",
            pki.display().to_string(),
            work.path().join("roles.db").display()
        ),
    )
    .unwrap();
    for (env, want, not) in [
        (None, from_file, from_env),
        (Some(from_env), from_env, from_file),
    ] {
        let mut cmd = Command::new(workspace_bin("mcim-roles"));
        cmd.args(["--config", file.to_str().unwrap(), "all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = env {
            cmd.env("MCIM_BASE_PORT", p.to_string());
        }
        let _server = Server(cmd.spawn().unwrap());
        assert!(mcim_e2e::listening(want, 5), "listens on {want}");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", not)).is_err(),
            "not on {not}"
        );
    }
    // The supplier keeps no database: a `--db` for it is a mistake, refused (exit 2, naming
    // it) rather than silently ignored.
    let out = Command::new(workspace_bin("mcim-roles"))
        .args(["supplier", "--pki", "pki", "--db", "sqlite://supplier.db"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--db"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A typo is refused before anything starts.
    std::fs::write(&file, "base_prot = 1\n").unwrap();
    let out = Command::new(workspace_bin("mcim-roles"))
        .args(["--config", file.to_str().unwrap(), "all"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown setting \"base_prot\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `Type=notify`: `mcim-roles` says READY=1 only once every port of every role it serves
/// listens; a port it cannot bind stops it with the role and address named, and no READY.
/// The shipped configuration (what the Debian package installs as /etc/mcim/mcim-roles.toml)
/// starts a role as its unit would.
#[test]
fn mcim_roles_tells_systemd_it_is_ready_once_every_port_listens() {
    let work = tempfile::tempdir().unwrap();
    let pki = mcim_e2e::pki_init(work.path());
    let notify = |name: &str| {
        let path = work.path().join(name);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        (path, sock)
    };
    let base = mcim_e2e::free_ports(mcim_e2e::ROLE_PORTS);
    let (path, sock) = notify("notify-all");
    let _all = Server(
        Command::new(workspace_bin("mcim-roles"))
            .args(["all", "--pki", pki.to_str().unwrap()])
            .args(["--base-port", &base.to_string()])
            .env(
                "MCIM_DB",
                format!("sqlite://{}", work.path().join("all.db").display()),
            )
            .env("NOTIFY_SOCKET", &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // At READY, every role's port (the second SHO's too) already accepts connections.
    for port in base..base + mcim_e2e::ROLE_PORTS {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "port {port} not listening at READY"
        );
    }

    // The port is taken (by the process above): an error naming the role, no READY.
    let (path, sock) = notify("notify-taken");
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let out = Command::new(workspace_bin("mcim-roles"))
        .args(["pva", "--pki", pki.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{}", base + 4)])
        .env(
            "MCIM_DB",
            format!("sqlite://{}", work.path().join("pva.db").display()),
        )
        .env("NOTIFY_SOCKET", &path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pva (pva) on 127.0.0.1:"), "{err}");
    assert!(
        sock.recv(&mut buf).is_err(),
        "READY from a role that did not start"
    );

    // The shipped file, with this test's PKI, database folder and port, as the unit runs it.
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../network-roles/mcim-roles.toml");
    let port = mcim_e2e::free_ports(1);
    let (path, sock) = notify("notify-shipped");
    let _sho = Server(
        Command::new(workspace_bin("mcim-roles"))
            .args(["--config", shipped.to_str().unwrap(), "sho"])
            .env("MCIM_PKI", &pki)
            .env(
                "MCIM_DB",
                format!("sqlite://{}", work.path().join("sho.db").display()),
            )
            .env("MCIM_LISTEN", format!("127.0.0.1:{port}"))
            .env("NOTIFY_SOCKET", &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    assert!(work.path().join("sho.db").exists());
}
