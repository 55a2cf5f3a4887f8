#!/usr/bin/env bash
# Makes the serving certificate of kmm-preflight for Kubernetes without cert-manager: a private CA
# and a certificate for the Service, then the kustomize inputs that install them.
#
#   deploy/scripts/make-serving-cert.sh            # then: kubectl apply -k deploy/overlays/kubernetes
#   deploy/scripts/make-serving-cert.sh --help
#
# Writes into OUT (default deploy/overlays/kubernetes/serving-cert, a kustomize Component that
# deploy/overlays/kubernetes and deploy/overlays/single-replica-sqlite use; everything written
# there is git-ignored):
#   pki/ca.crt, pki/ca.key      the CA; kept and reused by later runs, so renewing the serving
#                               certificate leaves the APIService's caBundle unchanged
#   pki/tls.crt, pki/tls.key    the serving certificate (SANs SERVICE.NAMESPACE.svc and
#                               SERVICE.NAMESPACE.svc.CLUSTER_DOMAIN), signed by the CA; kustomize's
#                               secretGenerator turns them into the Secret kmm-preflight-serving-cert
#   apiservice-cabundle.yaml    a patch setting APIService v1beta2.kmm.sigs.x-k8s.io spec.caBundle
#
# The CA key is the key to impersonating the server to kube-apiserver: keep pki/ca.key safe (or
# move it away and pass --pki-dir when renewing). Needs openssl (1.1.1 or 3.x). Never sets
# insecureSkipTLSVerify.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/../overlays/kubernetes/serving-cert"
pki=""
namespace="kmm-preflight"
service="kmm-preflight"
cluster_domain="cluster.local"
apiservice="v1beta2.kmm.sigs.x-k8s.io"
days=365
ca_days=3650
new_ca=false

usage() {
  cat <<EOF
usage: $(basename "$0") [options]

Creates (or reuses) a CA and issues kmm-preflight's serving certificate, writing the kustomize
inputs of deploy/overlays/kubernetes (and single-replica-sqlite).

  --out DIR              output directory (default: deploy/overlays/kubernetes/serving-cert)
  --pki-dir DIR          where the CA and the certificate live (default: OUT/pki)
  --namespace NS         namespace of the Service (default: $namespace)
  --service NAME         name of the Service (default: $service)
  --cluster-domain D     cluster DNS domain (default: $cluster_domain)
  --days N               validity of the serving certificate in days (default: $days)
  --ca-days N            validity of a new CA in days (default: $ca_days)
  --new-ca               replace the CA; the previous one stays in the caBundle (pki/ca-previous.crt)
                         until you delete that file and run the script again
  -h, --help             this text
EOF
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    --pki-dir) pki="${2:?--pki-dir needs a directory}"; shift 2 ;;
    --pki-dir=*) pki="${1#*=}"; shift ;;
    --namespace) namespace="${2:?--namespace needs a name}"; shift 2 ;;
    --namespace=*) namespace="${1#*=}"; shift ;;
    --service) service="${2:?--service needs a name}"; shift 2 ;;
    --service=*) service="${1#*=}"; shift ;;
    --cluster-domain) cluster_domain="${2:?--cluster-domain needs a domain}"; shift 2 ;;
    --cluster-domain=*) cluster_domain="${1#*=}"; shift ;;
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    --days=*) days="${1#*=}"; shift ;;
    --ca-days) ca_days="${2:?--ca-days needs a number}"; shift 2 ;;
    --ca-days=*) ca_days="${1#*=}"; shift ;;
    --new-ca) new_ca=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ "$days" =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive number, got '$days'"
[[ "$ca_days" =~ ^[1-9][0-9]*$ ]] || die "--ca-days must be a positive number, got '$ca_days'"
dns_label='^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'
[[ "$namespace" =~ $dns_label ]] || die "--namespace is not a DNS label: '$namespace'"
[[ "$service" =~ $dns_label ]] || die "--service is not a DNS label: '$service'"
[[ "$cluster_domain" =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]] || die "--cluster-domain is not a DNS name: '$cluster_domain'"
command -v openssl >/dev/null || die "openssl is missing (Debian: apt-get install openssl)"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
pki="${pki:-$out/pki}"
mkdir -p "$pki"
pki="$(cd "$pki" && pwd)"
chmod 0700 "$pki"
umask 077
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

host="$service.$namespace.svc"
fqdn="$host.$cluster_domain"

# The CA: reused while it is valid for the serving certificate's whole lifetime.
if [ -f "$pki/ca.crt" ] && [ -f "$pki/ca.key" ] && [ "$new_ca" = false ]; then
  if ! openssl x509 -in "$pki/ca.crt" -noout -checkend $((days * 86400)) >/dev/null; then
    die "the CA in $pki expires within $days days: run again with --new-ca"
  fi
  echo "reusing the CA in $pki"
else
  if [ -f "$pki/ca.crt" ]; then
    cp "$pki/ca.crt" "$pki/ca-previous.crt"
    echo "replacing the CA; the previous one stays trusted (pki/ca-previous.crt) until you delete it and run again"
  fi
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca.key"
  cat >"$work/ca.ext" <<EOF
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  openssl req -new -key "$work/ca.key" -subj "/CN=kmm-preflight-serving-ca@$(date +%s)" -out "$work/ca.csr"
  openssl x509 -req -in "$work/ca.csr" -signkey "$work/ca.key" -days "$ca_days" -sha256 \
    -extfile "$work/ca.ext" -out "$work/ca.crt" 2>/dev/null
  mv "$work/ca.key" "$pki/ca.key"
  mv "$work/ca.crt" "$pki/ca.crt"
  echo "created a CA in $pki (valid $ca_days days)"
fi

# The serving certificate for the Service, as kube-apiserver's aggregation layer dials it.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/tls.key"
cat >"$work/tls.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:$host, DNS:$fqdn
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash
EOF
openssl req -new -key "$work/tls.key" -subj "/CN=$host" -out "$work/tls.csr"
openssl x509 -req -in "$work/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
  -days "$days" -sha256 -extfile "$work/tls.ext" -out "$work/tls.crt" 2>/dev/null
openssl verify -CAfile "$pki/ca.crt" -purpose sslserver "$work/tls.crt" >/dev/null ||
  die "the new serving certificate does not verify against the CA"
mv "$work/tls.key" "$pki/tls.key"
mv "$work/tls.crt" "$pki/tls.crt"
echo "issued the serving certificate for $host and $fqdn (valid $days days)"

# caBundle: the CA, plus the previous CA while pods may still serve a certificate signed by it.
cat "$pki/ca.crt" >"$work/ca-bundle.crt"
[ -f "$pki/ca-previous.crt" ] && cat "$pki/ca-previous.crt" >>"$work/ca-bundle.crt"
ca_bundle="$(openssl base64 -A -in "$work/ca-bundle.crt")"
cat >"$out/apiservice-cabundle.yaml" <<EOF
# Generated by deploy/scripts/make-serving-cert.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); do not commit.
# The CA that signed the serving certificate of Service $namespace/$service.
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: $apiservice
spec:
  caBundle: $ca_bundle
EOF
chmod 0644 "$out/apiservice-cabundle.yaml"

if [ "$pki" != "$out/pki" ]; then
  # The Component reads pki/tls.* beside its kustomization.yaml.
  mkdir -p "$out/pki"
  cp "$pki/tls.crt" "$pki/tls.key" "$out/pki/"
fi
echo "wrote $out/apiservice-cabundle.yaml and $out/pki/tls.{crt,key}"
echo "next: kubectl apply -k deploy/overlays/kubernetes   (or single-replica-sqlite)"
