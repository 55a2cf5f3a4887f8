/**
 * The `kube-system/extension-apiserver-authentication` ConfigMap that kube-apiserver publishes
 * for extension API servers: the client CA, the request-header (front-proxy) CA, the allowed
 * front-proxy names and the header names. List values are JSON arrays.
 */
import type { X509Certificate } from 'node:crypto';
import type { RequestHeaderConfig } from './request-header.ts';
import { parseCertificateBundle } from './x509.ts';

export const AUTHENTICATION_CONFIGMAP = { namespace: 'kube-system', name: 'extension-apiserver-authentication' } as const;

export interface DelegatedAuthenticationConfig {
  readonly clientCa: readonly X509Certificate[];
  readonly clientCaPem: string;
  /** Undefined when the cluster has no front proxy configured. */
  readonly requestHeader?: RequestHeaderConfig;
  readonly requestHeaderCaPem: string;
}

function jsonList(data: Readonly<Record<string, string>>, key: string): string[] {
  const raw = data[key];
  if (raw === undefined || raw.trim() === '') return [];
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw);
  } catch {
    throw new Error(`${AUTHENTICATION_CONFIGMAP.namespace}/${AUTHENTICATION_CONFIGMAP.name}: ${key} is not a JSON array of strings`);
  }
  if (!Array.isArray(parsed) || parsed.some((v) => typeof v !== 'string')) {
    throw new Error(`${AUTHENTICATION_CONFIGMAP.namespace}/${AUTHENTICATION_CONFIGMAP.name}: ${key} is not a JSON array of strings`);
  }
  return parsed as string[];
}

/** Parses the ConfigMap's data; throws with the key at fault. */
export function parseAuthenticationConfigMap(data: Readonly<Record<string, string>>): DelegatedAuthenticationConfig {
  const clientCaPem = data['client-ca-file'] ?? '';
  const requestHeaderCaPem = data['requestheader-client-ca-file'] ?? '';
  const requestHeaderCa = requestHeaderCaPem ? parseCertificateBundle(requestHeaderCaPem) : [];
  return {
    clientCa: clientCaPem ? parseCertificateBundle(clientCaPem) : [],
    clientCaPem,
    requestHeaderCaPem,
    ...(requestHeaderCa.length > 0
      ? {
          requestHeader: {
            caCertificates: requestHeaderCa,
            allowedNames: jsonList(data, 'requestheader-allowed-names'),
            usernameHeaders: jsonList(data, 'requestheader-username-headers'),
            groupHeaders: jsonList(data, 'requestheader-group-headers'),
            extraHeaderPrefixes: jsonList(data, 'requestheader-extra-headers-prefix'),
            uidHeaders: jsonList(data, 'requestheader-uid-headers'),
          },
        }
      : {}),
  };
}
