//! Requests that name another method than their own. Web frameworks let a POST stand for another method: the
//! `X-HTTP-Method-Override` header (Express `method-override`, Rack::MethodOverride, Google APIs, ASP.NET Core's
//! `HttpMethodOverride`), `X-HTTP-Method` (OData, Microsoft), `X-Method-Override`, and the `_method` parameter of
//! the query or a form body (Rails, Laravel, Symfony, Spring's `HiddenHttpMethodFilter`, multipart forms included).
//! A rule on `method: DELETE` would not see a POST that the application routes as a DELETE, and an allow rule on
//! `method: POST` would pass one. Whether the upstream honours the override cannot be known, so a request naming
//! another method is decided under its own method and under each method it names (`proxy::readings`), and refused
//! when those decisions differ. A `_method` part of a multipart body is not read ([`other_methods`]).

use crate::encoding::{is_form, percent_decode};
use crate::model::HttpRequest;

/// The header fields that name a method (lower-case).
const HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];
/// The parameter that names a method, in the query or a form.
const PARAM: &str = "_method";

/// The methods other than its own (upper-cased, each once, in the order met) that `http` names in an override header
/// (a header's list, RFC 9110 §5.3, by each element) or a `_method` parameter of its query or form; compared
/// without regard to case. `None` when a `multipart/*` body has a part named `_method`: its value is not read here,
/// so the method the receiver routes cannot be told. An uploaded file that merely holds the text `name=_method` does
/// not count.
pub fn other_methods(http: &HttpRequest) -> Option<Vec<String>> {
    let by_part = http.content_type.as_deref().is_some_and(|ct| {
        ct.trim_start()
            .to_ascii_lowercase()
            .starts_with("multipart/")
            && super::multipart::names_part(ct, &http.body, PARAM)
    });
    if by_part {
        return None;
    }
    let by_header = http
        .headers
        .0
        .iter()
        .filter(|(k, _)| HEADERS.iter().any(|h| k.eq_ignore_ascii_case(h)))
        .flat_map(|(_, v)| v.split(','))
        .map(str::to_string);
    let by_query = http.query.get_all(PARAM).map(str::to_string);
    let form = is_form(http.content_type.as_deref()).then(|| {
        http.body.split('&').filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true) == PARAM).then(|| percent_decode(v, true))
        })
    });
    let mut methods: Vec<String> = Vec::new();
    for m in by_header.chain(by_query).chain(form.into_iter().flatten()) {
        let m = m.trim().to_ascii_uppercase();
        if !m.is_empty() && !m.eq_ignore_ascii_case(http.method.trim()) && !methods.contains(&m) {
            methods.push(m);
        }
    }
    Some(methods)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pairs;

    fn request(
        method: &str,
        headers: &[(&str, &str)],
        query: &[(&str, &str)],
        ct: Option<&str>,
        body: &str,
    ) -> HttpRequest {
        let pairs = |p: &[(&str, &str)]| {
            Pairs(
                p.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        HttpRequest {
            method: method.into(),
            path: "/x".into(),
            headers: pairs(headers),
            query: pairs(query),
            content_type: ct.map(str::to_string),
            body: body.into(),
            ..HttpRequest::default()
        }
    }

    #[test]
    fn another_method_named_anywhere_is_found() {
        let form = Some("application/x-www-form-urlencoded");
        for http in [
            request(
                "POST",
                &[("x-http-method-override", "DELETE")],
                &[],
                None,
                "",
            ),
            request("POST", &[("x-http-method", "delete")], &[], None, ""),
            request(
                "POST",
                &[("x-method-override", "POST, DELETE")],
                &[],
                None,
                "",
            ),
            request("POST", &[], &[("_method", "DELETE")], None, ""),
            request("POST", &[], &[], form, "a=1&_method=DELETE"),
            request("POST", &[], &[], form, "a=1&%5Fmethod=put"),
            request(
                "POST",
                &[],
                &[],
                Some("multipart/form-data; boundary=b"),
                "--b\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--b--",
            ),
        ] {
            assert_ne!(other_methods(&http), Some(vec![]), "{http:?}");
        }
        for http in [
            request("POST", &[], &[], None, ""),
            request(
                "DELETE",
                &[("x-http-method-override", "delete")],
                &[],
                None,
                "",
            ),
            request("POST", &[], &[], Some("text/plain"), "_method=DELETE"),
            request("GET", &[], &[("method", "DELETE")], None, ""),
            // An uploaded file holding the text, not a part of that name.
            request(
                "POST",
                &[],
                &[],
                Some("multipart/form-data; boundary=b"),
                "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.py\"\r\n\r\nf(name=_method)\r\n--b--",
            ),
        ] {
            assert_eq!(other_methods(&http), Some(vec![]), "{http:?}");
        }
    }

    #[test]
    fn the_methods_named_are_given_each_once_and_a_multipart_part_is_not_read() {
        let form = Some("application/x-www-form-urlencoded");
        let http = request(
            "POST",
            &[
                ("x-http-method-override", "get, Delete"),
                ("x-http-method", "GET"),
            ],
            &[("_method", "put")],
            form,
            "_method=PATCH&_method=post",
        );
        assert_eq!(
            other_methods(&http),
            Some(vec![
                "GET".into(),
                "DELETE".into(),
                "PUT".into(),
                "PATCH".into()
            ])
        );
        let part = request(
            "POST",
            &[],
            &[],
            Some("multipart/form-data; boundary=b"),
            "--b\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nPOST\r\n--b--",
        );
        assert_eq!(other_methods(&part), None);
    }
}
