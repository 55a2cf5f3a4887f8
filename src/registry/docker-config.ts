/**
 * Pull secrets: `.dockerconfigjson` parsing and the host matching containerd and the Docker CLI
 * apply to its `auths` keys.
 *
 * Secrets stay in the returned map only: no error message here quotes a password, an `auth`
 * value or a token, only the `auths` key (a host name) they belong to.
 */
import type { DockerConfig, RegistryAuth } from './types.ts';

/** The registry host of Docker Hub in image references. */
const DOCKER_HUB = 'docker.io';
/** Keys that mean Docker Hub in a config file (after scheme and path are stripped). */
const DOCKER_HUB_ALIASES: ReadonlySet<string> = new Set(['docker.io', 'index.docker.io', 'registry-1.docker.io', 'registry.hub.docker.com']);

export class DockerConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DockerConfigError';
  }
}

/**
 * Parses the content of a `kubernetes.io/dockerconfigjson` secret (`{"auths": {host: {...}}}`).
 *
 * Per entry: `auth` (base64 of `user:password`, which wins over separate fields, as in the Docker
 * CLI), or `username`/`password`; `identitytoken` (an OAuth2 refresh token) and `registrytoken`
 * (a bearer token sent as is). Entries without any credential are kept (they make no difference
 * to a pull) so callers can still tell a host is listed. Keys are kept as written; use
 * {@link findRegistryAuth} to look up a registry host.
 *
 * @throws DockerConfigError naming the offending `auths` key, never its content.
 */
export function parseDockerConfigJson(text: string): DockerConfig {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    // The parser's message can quote the text, which holds the secrets.
    throw new DockerConfigError('the pull secret is not valid JSON');
  }
  if (!isObject(doc)) throw new DockerConfigError('the pull secret is not a JSON object');
  const auths = doc['auths'];
  if (auths === undefined) {
    throw new DockerConfigError('the pull secret has no "auths" object (a .dockerconfigjson secret is expected, not a legacy .dockercfg)');
  }
  if (!isObject(auths)) throw new DockerConfigError('"auths" in the pull secret is not an object');

  const result = new Map<string, RegistryAuth>();
  for (const [key, entry] of Object.entries(auths)) {
    if (!isObject(entry)) throw new DockerConfigError(`the pull secret entry for "${key}" is not an object`);
    result.set(key, parseEntry(key, entry));
  }
  return result;
}

function parseEntry(key: string, entry: Record<string, unknown>): RegistryAuth {
  const str = (field: string): string | undefined => {
    const value = entry[field];
    if (value === undefined || value === null || value === '') return undefined;
    if (typeof value !== 'string') throw new DockerConfigError(`"${field}" of the pull secret entry for "${key}" is not a string`);
    return value;
  };
  let username = str('username');
  let password = str('password');
  const auth = str('auth');
  if (auth !== undefined) {
    const decoded = decodeBase64Strict(auth);
    const colon = decoded?.indexOf(':') ?? -1;
    if (decoded === undefined || colon === -1) {
      throw new DockerConfigError(`"auth" of the pull secret entry for "${key}" is not base64 of "user:password"`);
    }
    username = decoded.slice(0, colon);
    password = decoded.slice(colon + 1);
  }
  const identityToken = str('identitytoken');
  const registryToken = str('registrytoken');
  return {
    ...(username ? { username } : {}),
    ...(password ? { password } : {}),
    ...(identityToken ? { identityToken } : {}),
    ...(registryToken ? { registryToken } : {}),
  };
}

function decodeBase64Strict(value: string): string | undefined {
  const trimmed = value.trim();
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(trimmed) && !/^[A-Za-z0-9_-]*={0,2}$/.test(trimmed)) return undefined;
  const buf = Buffer.from(trimmed, trimmed.includes('-') || trimmed.includes('_') ? 'base64url' : 'base64');
  return buf.toString('utf8');
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * The host (with port) an `auths` key stands for, as the Docker CLI's `ConvertToHostname`:
 * scheme and anything from the first `/` stripped, lower-cased; Docker Hub's aliases
 * (`https://index.docker.io/v1/`, `index.docker.io`, `registry-1.docker.io`) become `docker.io`.
 */
export function normalizeAuthKey(key: string): string {
  let host = key.trim();
  host = host.replace(/^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//, '');
  const slash = host.indexOf('/');
  if (slash !== -1) host = host.slice(0, slash);
  host = host.toLowerCase();
  return DOCKER_HUB_ALIASES.has(host) ? DOCKER_HUB : host;
}

/**
 * The credentials for `registryHost` (the domain of an image reference, e.g. `quay.io`,
 * `registry.local:5000`, `docker.io`): the entry whose key is exactly that host, else the entry
 * whose normalised key ({@link normalizeAuthKey}) is that host. Ports must match: an entry for
 * `registry.local` does not apply to `registry.local:5000`.
 */
export function findRegistryAuth(config: DockerConfig | undefined, registryHost: string): RegistryAuth | undefined {
  if (config === undefined) return undefined;
  const exact = config.get(registryHost);
  if (exact !== undefined) return exact;
  const wanted = normalizeAuthKey(registryHost);
  let found: RegistryAuth | undefined;
  for (const [key, auth] of config) {
    if (normalizeAuthKey(key) !== wanted) continue;
    // Prefer an entry that has credentials over an empty one for the same host.
    if (found === undefined || (!hasCredentials(found) && hasCredentials(auth))) found = auth;
  }
  return found;
}

/** True when `auth` holds anything that can be sent. */
export function hasCredentials(auth: RegistryAuth | undefined): boolean {
  return (
    auth !== undefined &&
    (auth.registryToken !== undefined || auth.identityToken !== undefined || auth.username !== undefined || auth.password !== undefined)
  );
}
