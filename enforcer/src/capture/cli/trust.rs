//! The environment through which an agent's clients learn to trust the enforcer CA. `enforcer exec` sets every
//! variable below, replacing whatever the caller's environment had (often the system bundle, which lacks the
//! enforcer CA). Each was taken from the tool's own documentation or source; docs/agents.md has the table with the
//! tools that read each one and what cannot be set this way.

use std::path::Path;

/// Which published file a variable names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TrustFile {
    /// System roots + the enforcer CA: for variables whose file replaces the client's roots.
    Bundle,
    /// The enforcer CA alone: for variables whose file is added to roots the client keeps.
    CaCert,
}

/// A variable and the file it names.
#[derive(Debug, Clone, Copy)]
pub(super) struct TrustVariable {
    pub name: &'static str,
    pub file: TrustFile,
}

const fn bundle(name: &'static str) -> TrustVariable {
    TrustVariable {
        name,
        file: TrustFile::Bundle,
    }
}

/// Every variable `enforcer exec` sets, in the order of the table in docs/agents.md.
pub(super) const TRUST_VARIABLES: &[TrustVariable] = &[
    // OpenSSL's default verify file: curl, Python ssl/urllib/httpx/aiohttp, Ruby, PHP, .NET on Linux; Go
    // crypto/x509; rustls-native-certs (reqwest with native roots); uv.
    bundle("SSL_CERT_FILE"),
    // Python requests (pip uses its own option, below), conda, the Azure CLI, google-auth.
    bundle("REQUESTS_CA_BUNDLE"),
    // The curl command line; Python requests when REQUESTS_CA_BUNDLE is unset.
    bundle("CURL_CA_BUNDLE"),
    // Node.js, Bun, Deno 2.8+: added to their built-in roots.
    TrustVariable {
        name: "NODE_EXTRA_CA_CERTS",
        file: TrustFile::CaCert,
    },
    // pip's `--cert`, above any `cert =` in pip.conf.
    bundle("PIP_CERT"),
    // npm's `cafile`, above any .npmrc.
    bundle("NPM_CONFIG_CAFILE"),
    // git's http.sslCAInfo, above any gitconfig.
    bundle("GIT_SSL_CAINFO"),
    // cargo's http.cainfo, above any .cargo/config.toml.
    bundle("CARGO_HTTP_CAINFO"),
    // The AWS CLI and SDKs, above ca_bundle in ~/.aws/config.
    bundle("AWS_CA_BUNDLE"),
    // gcloud's core/custom_ca_certs_file.
    bundle("CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE"),
    // httplib2 (google-api-python-client).
    bundle("HTTPLIB2_CA_CERTS"),
    // gRPC C core (Python, Ruby, C++, PHP) and grpc-js.
    bundle("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"),
    // conda's ssl_verify, above any .condarc.
    bundle("CONDA_SSL_VERIFY"),
    // Deno.
    bundle("DENO_CERT"),
    // Nix.
    bundle("NIX_SSL_CERT_FILE"),
    // Hex (Elixir, Erlang).
    bundle("HEX_CACERTS_PATH"),
];

/// `(variable, path)` for every trust variable, given the published bundle and CA certificate.
pub(super) fn trust_env<'a>(
    bundle: &'a Path,
    ca_cert: &'a Path,
) -> impl Iterator<Item = (&'static str, &'a Path)> {
    TRUST_VARIABLES.iter().map(move |v| {
        let path = match v.file {
            TrustFile::Bundle => bundle,
            TrustFile::CaCert => ca_cert,
        };
        (v.name, path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/agents.md documents exactly the variables `enforcer exec` sets.
    #[test]
    fn the_documented_table_lists_every_variable() {
        let doc = include_str!("../../../../docs/agents.md");
        for v in TRUST_VARIABLES {
            let row = format!("| `{}` |", v.name);
            assert!(
                doc.contains(&row),
                "docs/agents.md has no row for {}",
                v.name
            );
        }
        let documented = doc
            .lines()
            .skip_while(|l| !l.starts_with("## Trusting the enforcer CA"))
            .take_while(|l| !l.starts_with("### Not set"))
            .filter(|l| l.starts_with("| `"))
            .count();
        assert_eq!(documented, TRUST_VARIABLES.len(), "rows in the table");
    }

    #[test]
    fn additive_variables_name_the_ca_alone() {
        let (b, c) = (
            Path::new("/s/public/bundle.pem"),
            Path::new("/s/public/ca.pem"),
        );
        let env: Vec<_> = trust_env(b, c).collect();
        assert!(env.contains(&("NODE_EXTRA_CA_CERTS", c)));
        assert!(env.contains(&("SSL_CERT_FILE", b)));
        assert!(env.contains(&("PIP_CERT", b)));
    }
}
