/**
 * The registry client against a real registry (Debian's docker-registry, distribution 2.8):
 * manifests by tag and digest in Docker v2 and OCI media types, indexes and platforms, token and
 * Basic auth, TLS, plain HTTP, and, through a fault-injecting proxy, retries, digest checks,
 * size limits and timeouts.
 */
import type { Readable } from 'node:stream';
import { gunzipSync, zstdDecompressSync } from 'node:zlib';
import t, { type Test } from 'tap';
import tar from 'tar-stream';
import { parseImageReference, type ImageReference } from '../../src/image/reference.ts';
import { createRegistryClient, normalizePlatform, parseChallenges, selectPlatform, type RegistryClientOptions, type RegistryHttpClient } from '../../src/registry/client.ts';
import { DockerConfigError, findRegistryAuth, normalizeAuthKey, parseDockerConfigJson } from '../../src/registry/docker-config.ts';
import { RegistryError, type Platform, type RegistryErrorCode } from '../../src/registry/types.ts';
import { gzipBomb, pushImage, pushIndex, rawTar, sha256, type PushedImage } from '../helpers/images.ts';
import { accessFor, dockerConfigFor, startFaultProxy, startRegistry, type FaultRule, type TestRegistry } from '../helpers/registry.ts';
import { freePort } from '../helpers/server.ts';

const AMD64: Platform = { os: 'linux', architecture: 'amd64' };
const ARM64: Platform = { os: 'linux', architecture: 'arm64' };
const TEST_TIMEOUT = 60_000;


function newClient(tt: Test, options: RegistryClientOptions = {}): RegistryHttpClient {
  const client = createRegistryClient({ retries: 1, baseBackoffMs: 10, timeoutMs: 10_000, ...options });
  tt.teardown(() => client.close());
  return client;
}

function refOf(registry: Pick<TestRegistry, 'host'>, repoTag: string): ImageReference {
  return parseImageReference(`${registry.host}/${repoTag}`);
}

async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** Awaits a RegistryError with `code`; fails the test (with what happened) otherwise. */
async function registryError(tt: Test, promise: Promise<unknown>, code: RegistryErrorCode): Promise<RegistryError> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof RegistryError) {
      tt.equal(err.code, code, `error code (message: ${err.message})`);
      return err;
    }
    throw err;
  }
  tt.fail(`expected a ${code} RegistryError, but the call succeeded`);
  throw new Error('unreachable');
}

/** Everything an error could show: message, stack, cause chain, JSON. */
function errorText(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  for (let i = 0; i < 5 && e !== undefined && e !== null; i++) {
    parts.push(String(e), (e as Error).stack ?? '', JSON.stringify(e) ?? '');
    e = (e as Error).cause;
  }
  return parts.join('\n');
}

function recorder() {
  const sleeps: number[] = [];
  return { sleeps, sleep: async (ms: number) => void sleeps.push(ms) };
}

function twoLayerImage(registry: TestRegistry, repoTag: string, mediaTypes: 'oci' | 'docker', platform: Platform = AMD64): Promise<PushedImage> {
  return pushImage(registry, repoTag, {
    mediaTypes,
    platform,
    layers: [
      { entries: [{ path: 'opt/', type: 'directory' }, { path: 'opt/README', content: `base layer ${repoTag} ${platform.architecture}` }], compression: 'gzip' },
      {
        entries: [{ path: 'opt/lib/modules/6.1.0/extra/kmm_ci_a.ko', content: Buffer.alloc(4096, platform.architecture.length) }],
        compression: mediaTypes === 'oci' ? 'zstd' : 'none',
      },
    ],
  });
}

// One plain registry serves most tests; the others start their own.
const plain = await startRegistry();
t.teardown(() => plain.stop());
const plainAccess = accessFor(plain);

t.test('resolves by tag and by digest, Docker v2 and OCI, and streams verified blobs', { timeout: TEST_TIMEOUT }, async (t) => {
  const client = newClient(t);
  for (const mediaTypes of ['docker', 'oci'] as const) {
    const image = await twoLayerImage(plain, `kmm/simple-${mediaTypes}:v1`, mediaTypes);
    const before = client.bytesReceived;
    const byTag = await client.resolveImage(refOf(plain, `kmm/simple-${mediaTypes}:v1`), plainAccess, AMD64);
    t.equal(byTag.digest, image.digest, `${mediaTypes}: digest of a tag`);
    t.equal(byTag.mediaType, image.mediaType);
    t.same(byTag.config, image.config);
    t.same(byTag.layers, image.layers);
    t.equal(byTag.indexDigest, undefined, 'no index');
    t.equal(byTag.reference.tag, 'v1');
    t.ok(client.bytesReceived - before >= image.manifest.length, 'manifest bytes counted');

    const byDigest = await client.resolveImage(refOf(plain, `kmm/simple-${mediaTypes}@${image.digest}`), plainAccess, AMD64);
    t.equal(byDigest.digest, image.digest, `${mediaTypes}: by digest`);
    t.same(byDigest.layers, image.layers);

    const beforeBlobs = client.bytesReceived;
    const config = await readAll(await client.openBlob(byTag.reference, byTag.config, plainAccess));
    t.same(config, image.configBytes, 'config blob');
    let total = config.length;
    for (let i = 0; i < image.layers.length; i++) {
      const data = await readAll(await client.openBlob(byTag.reference, byTag.layers[i]!, plainAccess));
      t.ok(data.equals(image.layerData[i]!), `${mediaTypes}: layer ${i} content`);
      total += data.length;
    }
    t.equal(client.bytesReceived - beforeBlobs, total, 'bytesReceived counts every blob byte');
  }
});

t.test('a reference without a tag pulls latest; a reference on localhost:PORT parses the port', { timeout: TEST_TIMEOUT }, async (t) => {
  const client = newClient(t);
  const image = await twoLayerImage(plain, 'kmm/latest:latest', 'oci');
  const ref = refOf(plain, 'kmm/latest');
  t.match(ref.domain, /^127\.0\.0\.1:\d+$/, 'the port is part of the registry, not a tag');
  t.equal((await client.resolveImage(ref, plainAccess, AMD64)).digest, image.digest);
  const port = plain.host.split(':')[1]!;
  const viaLocalhost = parseImageReference(`localhost:${port}/kmm/latest:latest`);
  t.equal(viaLocalhost.domain, `localhost:${port}`);
  t.equal((await client.resolveImage(viaLocalhost, { insecure: true }, AMD64)).digest, image.digest);
});

t.test('an index resolves to the wanted platform, never the local CPU', { timeout: TEST_TIMEOUT }, async (t) => {
  const client = newClient(t);
  for (const mediaTypes of ['oci', 'docker'] as const) {
    const repo = `kmm/multi-${mediaTypes}`;
    const amd = await twoLayerImage(plain, `${repo}:amd64`, mediaTypes, AMD64);
    const arm = await twoLayerImage(plain, `${repo}:arm64`, mediaTypes, { ...ARM64, variant: 'v8' });
    const index = await pushIndex(
      plain,
      `${repo}:v1`,
      [
        { platform: AMD64, ref: amd },
        { platform: { ...ARM64, variant: 'v8' }, ref: arm },
        // An attestation manifest as buildx adds them: never a match, never listed.
        { platform: { os: 'unknown', architecture: 'unknown' }, ref: amd.descriptor },
      ],
      { mediaTypes },
    );
    const ref = refOf(plain, `${repo}:v1`);

    const a = await client.resolveImage(ref, plainAccess, AMD64);
    t.equal(a.digest, amd.digest, `${mediaTypes}: amd64`);
    t.equal(a.indexDigest, index.digest);
    t.same(a.platform, AMD64);
    t.same(a.layers, amd.layers);

    const b = await client.resolveImage(ref, plainAccess, ARM64);
    t.equal(b.digest, arm.digest, `${mediaTypes}: arm64 without a variant matches arm64/v8`);
    t.same(b.platform, { ...ARM64, variant: 'v8' });
    t.equal((await client.resolveImage(ref, plainAccess, { os: 'linux', architecture: 'aarch64', variant: '8' })).digest, arm.digest, 'aarch64/8 is arm64/v8');

    const byDigest = await client.resolveImage(refOf(plain, `${repo}@${index.digest}`), plainAccess, ARM64);
    t.equal(byDigest.digest, arm.digest, 'an index by digest');

    const err = await registryError(t, client.resolveImage(ref, plainAccess, { os: 'linux', architecture: 's390x' }), 'NoMatchingPlatform');
    t.match(err.message, 'linux/s390x');
    t.match(err.message, 'linux/amd64');
    t.match(err.message, 'linux/arm64/v8');
    t.notMatch(err.message, 'unknown', 'attestation entries are not listed');
    await registryError(t, client.resolveImage(ref, plainAccess, { os: 'linux', architecture: 'arm', variant: 'v7' }), 'NoMatchingPlatform');
    await registryError(t, client.resolveImage(ref, plainAccess, { os: 'windows', architecture: 'amd64' }), 'NoMatchingPlatform');
  }
});

t.test('platform matching and challenge parsing', async (t) => {
  t.same(normalizePlatform({ os: 'Linux', architecture: 'x86_64' }), { os: 'linux', architecture: 'amd64', variant: '' });
  t.same(normalizePlatform({ os: 'linux', architecture: 'arm64' }), { os: 'linux', architecture: 'arm64', variant: 'v8' });
  t.same(normalizePlatform({ os: 'linux', architecture: 'arm' }), { os: 'linux', architecture: 'arm', variant: 'v7' });
  const entries = [
    { id: 'arm-v6', platform: { os: 'linux', architecture: 'arm', variant: 'v6' } },
    { id: 'arm-v7', platform: { os: 'linux', architecture: 'arm', variant: 'v7' } },
    { id: 'arm64', platform: { os: 'linux', architecture: 'arm64' } },
    { id: 'none' },
  ];
  t.equal(selectPlatform(entries, { os: 'linux', architecture: 'arm' })?.id, 'arm-v7', 'arm defaults to v7');
  t.equal(selectPlatform(entries, { os: 'linux', architecture: 'arm', variant: 'v6' })?.id, 'arm-v6');
  t.equal(selectPlatform(entries, { os: 'linux', architecture: 'arm64', variant: 'v8' })?.id, 'arm64', 'v8 matches an entry without variant');
  t.equal(selectPlatform(entries, AMD64), undefined);

  t.same(parseChallenges('Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push"'), [
    { scheme: 'bearer', params: { realm: 'https://auth.example.com/token', service: 'registry.example.com', scope: 'repository:a/b:pull,push' } },
  ]);
  t.same(parseChallenges('Basic realm="Registry Realm", Bearer realm="https://x/t"'), [
    { scheme: 'basic', params: { realm: 'Registry Realm' } },
    { scheme: 'bearer', params: { realm: 'https://x/t' } },
  ]);
  t.same(parseChallenges(undefined), []);
});

t.test('docker config: auth forms and host matching', async (t) => {
  const secretPassword = 'hunter2-very-secret';
  const config = parseDockerConfigJson(
    JSON.stringify({
      auths: {
        'https://index.docker.io/v1/': { auth: Buffer.from(`hubuser:${secretPassword}`).toString('base64') },
        'quay.io': { username: 'quser', password: 'qpass' },
        'https://registry.example.com:5000/some/path': { auth: Buffer.from('u:p:with:colons').toString('base64') },
        'registry.example.com': { identitytoken: 'refresh-me' },
        'tokens.example.com': { registrytoken: 'bearer-me' },
      },
    }),
  );
  t.same(findRegistryAuth(config, 'docker.io'), { username: 'hubuser', password: secretPassword }, 'the Hub alias');
  t.same(findRegistryAuth(config, 'quay.io'), { username: 'quser', password: 'qpass' });
  t.same(findRegistryAuth(config, 'registry.example.com:5000'), { username: 'u', password: 'p:with:colons' }, 'scheme and path stripped, port kept');
  t.same(findRegistryAuth(config, 'registry.example.com'), { identityToken: 'refresh-me' }, 'a port must match');
  t.same(findRegistryAuth(config, 'tokens.example.com'), { registryToken: 'bearer-me' });
  t.equal(findRegistryAuth(config, 'registry.example.com:443'), undefined);
  t.equal(findRegistryAuth(config, 'ghcr.io'), undefined);
  t.equal(normalizeAuthKey('http://Localhost:5000/v2/'), 'localhost:5000');
  t.equal(normalizeAuthKey('registry-1.docker.io'), 'docker.io');

  const both = parseDockerConfigJson(JSON.stringify({ auths: { h: { username: 'x', password: 'y', auth: Buffer.from('a:b').toString('base64') } } }));
  t.same(both.get('h'), { username: 'a', password: 'b' }, 'auth wins over username/password, as in the Docker CLI');

  for (const bad of [
    `{"auths": {"h": {"auth": "${secretPassword}!!"}}}`,
    `{"auths": {"h": {"auth": "${Buffer.from(secretPassword).toString('base64')}"}}}`,
    `{"auths": {"h": {"password": 5}}} ${secretPassword}`,
    `{"auths": "${secretPassword}"}`,
    `{"h": {"auth": "${secretPassword}"}}`,
  ]) {
    const err = t.throws(() => parseDockerConfigJson(bad)) as unknown;
    t.ok(err instanceof DockerConfigError, String(err));
    t.notMatch(errorText(err), secretPassword, 'no secret in the message');
    t.notMatch(errorText(err), Buffer.from(secretPassword).toString('base64'));
  }
});

t.test('missing tag, repository and blob → NotFound naming what is missing', { timeout: TEST_TIMEOUT }, async (t) => {
  const client = newClient(t);
  const image = await twoLayerImage(plain, 'kmm/present:v1', 'oci');
  const tag = await registryError(t, client.resolveImage(refOf(plain, 'kmm/present:nope'), plainAccess, AMD64), 'NotFound');
  t.match(tag.message, /tag "nope" does not exist in repository "kmm\/present"/);
  t.match(tag.message, plain.host);
  const repo = await registryError(t, client.resolveImage(refOf(plain, 'kmm/absent:v1'), plainAccess, AMD64), 'NotFound');
  t.match(repo.message, /repository "kmm\/absent" does not exist on registry 127\.0\.0\.1:\d+/);
  const missingDigest = sha256('nothing here');
  const manifest = await registryError(t, client.resolveImage(refOf(plain, `kmm/present@${missingDigest}`), plainAccess, AMD64), 'NotFound');
  t.match(manifest.message, `no manifest ${missingDigest}`);
  const blob = await registryError(t, client.openBlob(image.ref, { mediaType: 'x', digest: missingDigest, size: 3 }, plainAccess), 'NotFound');
  t.match(blob.message, `no blob ${missingDigest}`);
});

t.test('token auth', { timeout: TEST_TIMEOUT }, async (t) => {
  const reg = await startRegistry({ auth: 'token' });
  t.teardown(() => reg.stop());
  const image = await twoLayerImage(reg, 'kmm/private:v1', 'oci');
  const ref = refOf(reg, 'kmm/private:v1');
  const password = reg.credentials!.password;

  t.test('right credentials: resolve and blobs, one token per scope', async (t) => {
    const client = newClient(t);
    const before = reg.tokenRequests();
    const resolved = await client.resolveImage(ref, accessFor(reg), AMD64);
    t.equal(resolved.digest, image.digest);
    const data = await readAll(await client.openBlob(ref, resolved.layers[0]!, accessFor(reg)));
    t.ok(data.equals(image.layerData[0]!));
    await client.resolveImage(ref, accessFor(reg), AMD64);
    t.equal(reg.tokenRequests() - before, 1, 'the token is cached per registry and scope');
  });

  t.test('an identity token (refresh token) from the pull secret', async (t) => {
    const client = newClient(t);
    const credentials = parseDockerConfigJson(JSON.stringify({ auths: { [reg.host]: { identitytoken: reg.refreshToken } } }));
    t.equal((await client.resolveImage(ref, { insecure: true, credentials }, AMD64)).digest, image.digest);
  });

  t.test('wrong credentials → Unauthorized, without the secret', async (t) => {
    const client = newClient(t);
    const wrong = `${password}-wrong`;
    const credentials = parseDockerConfigJson(dockerConfigFor(reg.host, { username: reg.credentials!.username, password: wrong }));
    const err = await registryError(t, client.resolveImage(ref, { insecure: true, credentials }, AMD64), 'Unauthorized');
    t.match(err.message, reg.host);
    t.match(err.message, /refused the credentials from the pull secret/);
    t.equal(err.registry, reg.host);
    for (const secret of [wrong, password, Buffer.from(`${reg.credentials!.username}:${wrong}`).toString('base64')]) {
      t.notMatch(errorText(err), secret, 'no secret in the error');
    }
  });

  t.test('anonymous → Unauthorized naming the registry; a cached token never serves another pull secret', async (t) => {
    const client = newClient(t);
    t.equal((await client.resolveImage(ref, accessFor(reg), AMD64)).digest, image.digest, 'with credentials first');
    const err = await registryError(t, client.resolveImage(ref, { insecure: true }, AMD64), 'Unauthorized');
    t.match(err.message, `registry ${reg.host}`);
    t.match(err.message, /no credentials were sent \(no pull secret was given\)/);
    t.notMatch(errorText(err), password);
    const other = parseDockerConfigJson(dockerConfigFor('other.example.com', { username: 'x', password: 'y' }));
    const err2 = await registryError(t, client.resolveImage(ref, { insecure: true, credentials: other }, AMD64), 'Unauthorized');
    t.match(err2.message, `the pull secret has no entry for ${reg.host}`);
  });

  t.test('pushes ask for push access', async (t) => {
    const client = newClient(t);
    const img = await pushImage(reg, 'kmm/pushed:v1', { client, layers: [{ entries: [{ path: 'x', content: 'y' }] }] });
    t.equal((await client.resolveImage(img.ref, accessFor(reg), AMD64)).digest, img.digest);
  });
});

t.test('htpasswd Basic auth', { timeout: TEST_TIMEOUT }, async (t) => {
  const reg = await startRegistry({ auth: 'htpasswd' });
  t.teardown(() => reg.stop());
  const image = await twoLayerImage(reg, 'kmm/basic:v1', 'docker');
  const ref = refOf(reg, 'kmm/basic:v1');
  const client = newClient(t);
  const resolved = await client.resolveImage(ref, accessFor(reg), AMD64);
  t.equal(resolved.digest, image.digest);
  t.ok((await readAll(await client.openBlob(ref, resolved.config, accessFor(reg)))).equals(image.configBytes));

  const wrong = `${reg.credentials!.password}X`;
  const credentials = parseDockerConfigJson(dockerConfigFor(reg.host, { username: reg.credentials!.username, password: wrong }));
  const err = await registryError(t, client.resolveImage(ref, { insecure: true, credentials }, AMD64), 'Unauthorized');
  t.match(err.message, reg.host);
  t.match(err.message, /with the credentials from the pull secret/);
  t.notMatch(errorText(err), wrong);
  t.notMatch(errorText(err), reg.credentials!.password);

  const anon = await registryError(t, client.resolveImage(ref, { insecure: true }, AMD64), 'Unauthorized');
  t.match(anon.message, /no credentials were sent/);
});

t.test('TLS: the CA given, refused without it, accepted with insecureSkipTLSVerify; plain HTTP needs insecure', { timeout: TEST_TIMEOUT }, async (t) => {
  const reg = await startRegistry({ tls: true });
  t.teardown(() => reg.stop());
  const image = await twoLayerImage(reg, 'kmm/tls:v1', 'oci');
  const ref = refOf(reg, 'kmm/tls:v1');
  const client = newClient(t);

  t.equal((await client.resolveImage(ref, { caCertificates: [reg.caCertPem!] }, AMD64)).digest, image.digest, 'with the CA');
  const refused = await registryError(t, client.resolveImage(ref, {}, AMD64), 'Unreachable');
  t.match(refused.message, /TLS connection to registry 127\.0\.0\.1:\d+ failed: its certificate is not signed by a trusted CA/);
  t.equal((await client.resolveImage(ref, { insecureSkipTLSVerify: true }, AMD64)).digest, image.digest, 'without verification');
  const blob = await readAll(await client.openBlob(ref, image.layers[1]!, { insecureSkipTLSVerify: true }));
  t.ok(blob.equals(image.layerData[1]!));

  // The plain registry: HTTPS to it fails, plain HTTP with `insecure` works.
  const plainRef = refOf(plain, 'kmm/tls-plain:v1');
  const plainImage = await twoLayerImage(plain, 'kmm/tls-plain:v1', 'oci');
  const https = await registryError(t, client.resolveImage(plainRef, {}, AMD64), 'Unreachable');
  t.match(https.message, /mark it insecure/);
  t.equal((await client.resolveImage(plainRef, { insecure: true }, AMD64)).digest, plainImage.digest);
});

t.test('a registry nobody listens on → Unreachable after the retries', { timeout: TEST_TIMEOUT }, async (t) => {
  const { sleeps, sleep } = recorder();
  const client = newClient(t, { retries: 2, sleep });
  const port = await freePort();
  const err = await registryError(t, client.resolveImage(parseImageReference(`127.0.0.1:${port}/kmm/x:v1`), { insecure: true }, AMD64), 'Unreachable');
  t.match(err.message, /connection was refused/);
  t.match(err.message, /after 3 attempts/);
  t.equal(sleeps.length, 2);
});

t.test('through the fault proxy', { timeout: TEST_TIMEOUT }, async (t) => {
  const image = await twoLayerImage(plain, 'kmm/faults:v1', 'oci');
  const big = await pushImage(plain, 'kmm/faults:big', { layers: [{ entries: [{ path: 'big.bin', content: Buffer.alloc(256 * 1024, 7) }], compression: 'none' }] });
  const manifestPath = '/v2/kmm/faults/manifests/';
  const blobPath = '/v2/kmm/faults/blobs/';
  const proxied = async (tt: Test, script: FaultRule[]) => {
    const proxy = await startFaultProxy(plain, script);
    tt.teardown(() => proxy.stop());
    return { proxy, access: accessFor(proxy), ref: (tag = 'v1') => refOf(proxy, `kmm/faults:${tag}`) };
  };
  const hits = (proxy: { requests: readonly { path: string }[] }, path: string) => proxy.requests.filter((r) => r.path.includes(path)).length;

  t.test('429 with Retry-After seconds, then success: the wait is honoured', async (t) => {
    const { proxy, access, ref } = await proxied(t, [{ path: manifestPath, fault: { kind: 'status', status: 429, headers: { 'retry-after': '3' } } }]);
    const { sleeps, sleep } = recorder();
    const client = newClient(t, { sleep, retries: 2 });
    t.equal((await client.resolveImage(ref(), access, AMD64)).digest, image.digest);
    t.same(sleeps, [3000], 'waited as Retry-After asked');
    t.equal(hits(proxy, manifestPath), 2);
  });

  t.test('Retry-After as an HTTP date, measured with the injected clock, and capped', async (t) => {
    const now = Date.parse('2025-01-01T00:00:00Z');
    const { proxy, access, ref } = await proxied(t, [
      { path: manifestPath, fault: { kind: 'status', status: 429, headers: { 'retry-after': new Date(now + 5_000).toUTCString() } } },
      { path: manifestPath, fault: { kind: 'status', status: 503, headers: { 'retry-after': '3600' } } },
    ]);
    const { sleeps, sleep } = recorder();
    const client = newClient(t, { sleep, now: () => now, retries: 3, maxBackoffMs: 8_000 });
    t.equal((await client.resolveImage(ref(), access, AMD64)).digest, image.digest);
    t.same(sleeps, [5000, 8000], 'the date is honoured; an hour is capped at maxBackoffMs');
    t.equal(hits(proxy, manifestPath), 3);
  });

  t.test('429 on every attempt → RateLimited', async (t) => {
    const { access, ref } = await proxied(t, [{ path: manifestPath, times: Infinity, fault: { kind: 'status', status: 429 } }]);
    const { sleeps, sleep } = recorder();
    const client = newClient(t, { sleep, retries: 2, baseBackoffMs: 100, random: () => 0.5 });
    const err = await registryError(t, client.resolveImage(ref(), access, AMD64), 'RateLimited');
    t.match(err.message, /rate-limited tag "v1" of repository "kmm\/faults" \(HTTP 429, asked 3 times\)/);
    t.same(sleeps, [75, 150], 'exponential backoff with jitter');
  });

  t.test('500 three times with retries=2 → ServerError', async (t) => {
    const { proxy, access, ref } = await proxied(t, [{ path: manifestPath, times: 3, fault: { kind: 'status', status: 500 } }]);
    const { sleeps, sleep } = recorder();
    const client = newClient(t, { sleep, retries: 2 });
    const err = await registryError(t, client.resolveImage(ref(), access, AMD64), 'ServerError');
    t.match(err.message, `registry ${proxy.host} failed with HTTP 500 on tag "v1" of repository "kmm/faults" (asked 3 times) (UNKNOWN)`);
    t.equal(hits(proxy, manifestPath), 3);
    t.equal(sleeps.length, 2);
  });

  t.test('500 twice with retries=2 → success', async (t) => {
    const { access, ref } = await proxied(t, [{ path: manifestPath, times: 2, fault: { kind: 'status', status: 500 } }]);
    const client = newClient(t, { sleep: async () => {}, retries: 2 });
    t.equal((await client.resolveImage(ref(), access, AMD64)).digest, image.digest);
  });

  t.test('a connection reset, then success (manifest and blob)', async (t) => {
    const { proxy, access, ref } = await proxied(t, [
      { path: manifestPath, fault: { kind: 'reset' } },
      { path: blobPath, fault: { kind: 'reset' } },
    ]);
    const { sleeps, sleep } = recorder();
    const client = newClient(t, { sleep, retries: 2 });
    const resolved = await client.resolveImage(ref(), access, AMD64);
    t.equal(resolved.digest, image.digest);
    const data = await readAll(await client.openBlob(ref(), resolved.layers[0]!, access));
    t.ok(data.equals(image.layerData[0]!));
    t.equal(sleeps.length, 2);
    t.same(proxy.requests.filter((r) => r.fault).map((r) => r.fault), ['reset', 'reset']);
  });

  t.test('resets on every attempt → Unreachable', async (t) => {
    const { access, ref } = await proxied(t, [{ path: manifestPath, times: Infinity, fault: { kind: 'reset' } }]);
    const client = newClient(t, { sleep: async () => {}, retries: 1 });
    const err = await registryError(t, client.resolveImage(ref(), access, AMD64), 'Unreachable');
    t.match(err.message, /connection was reset.*after 2 attempts/);
  });

  t.test('a corrupted blob → DigestMismatch at the end of the stream', async (t) => {
    const { access, ref } = await proxied(t, [{ path: big.layers[0]!.digest, fault: { kind: 'corrupt' } }]);
    const client = newClient(t);
    const stream = await client.openBlob(ref('big'), big.layers[0]!, access);
    let seen = 0;
    let error: unknown;
    let ended = false;
    stream.on('end', () => (ended = true));
    try {
      for await (const chunk of stream) seen += (chunk as Buffer).length;
    } catch (err) {
      error = err;
    }
    t.ok(error instanceof RegistryError && error.code === 'DigestMismatch', `DigestMismatch (${String(error)})`);
    t.match((error as Error).message, /with content whose digest is sha256:/);
    t.ok(seen > 0 && seen <= big.layers[0]!.size, `data passed before the end (${seen} bytes), provisional until the stream ends cleanly`);
    t.notOk(ended, 'no clean end');
  });

  t.test('a corrupted manifest fetched by digest or with Docker-Content-Digest → DigestMismatch', async (t) => {
    const { proxy, access, ref } = await proxied(t, [{ path: manifestPath, times: 2, fault: { kind: 'corrupt', offset: 20 } }]);
    const client = newClient(t);
    await registryError(t, client.resolveImage(refOf(proxy, `kmm/faults@${image.digest}`), access, AMD64), 'DigestMismatch');
    const err = await registryError(t, client.resolveImage(ref(), access, AMD64), 'DigestMismatch');
    t.match(err.message, `as ${image.digest}`);
  });

  t.test('a blob larger than its descriptor → TooLarge; shorter → DigestMismatch', async (t) => {
    const { access, ref } = await proxied(t, [{ path: blobPath, fault: { kind: 'chunked' } }]);
    const client = newClient(t);
    const layer = big.layers[0]!;
    const announced = await registryError(t, client.openBlob(refOf(plain, 'kmm/faults:big'), { ...layer, size: layer.size - 1 }, plainAccess), 'TooLarge');
    t.match(announced.message, `more than the ${layer.size - 1} bytes its descriptor says`);
    // Through the proxy the body comes chunked, without a length: caught while streaming.
    const streamed = await client.openBlob(ref('big'), { ...layer, size: layer.size - 1 }, access);
    const err = await readAll(streamed).then(
      () => undefined,
      (e: unknown) => e,
    );
    t.ok(err instanceof RegistryError && err.code === 'TooLarge', `TooLarge while streaming (${String(err)})`);
    const short = await client.openBlob(refOf(plain, 'kmm/faults:big'), { ...layer, size: layer.size + 10 }, plainAccess);
    const err2 = await readAll(short).then(
      () => undefined,
      (e: unknown) => e,
    );
    t.ok(err2 instanceof RegistryError && err2.code === 'DigestMismatch', `DigestMismatch for a short blob (${String(err2)})`);
  });

  t.test('a blob redirected to another origin is followed', async (t) => {
    const { proxy, access, ref } = await proxied(t, [{ path: blobPath, fault: { kind: 'redirect' } }]);
    const client = newClient(t);
    const data = await readAll(await client.openBlob(ref(), image.layers[1]!, access));
    t.ok(data.equals(image.layerData[1]!));
    t.same(proxy.requests.filter((r) => r.fault).map((r) => r.fault), ['redirect']);
  });

  t.test('a body that stalls longer than timeoutMs → Timeout', async (t) => {
    const { access, ref } = await proxied(t, [{ path: blobPath, fault: { kind: 'slow', chunkBytes: 1024, delayMs: 3_000 } }]);
    const client = newClient(t, { timeoutMs: 300 });
    const started = Date.now();
    const stream = await client.openBlob(ref('big'), big.layers[0]!, access);
    const err = await readAll(stream).then(
      () => undefined,
      (e: unknown) => e,
    );
    t.ok(err instanceof RegistryError && err.code === 'Timeout', `Timeout (${String(err)})`);
    t.ok(Date.now() - started < 2_500, 'the idle timeout fired, not the slow end');
  });

  t.test('a schema 1 manifest is rejected clearly', async (t) => {
    const body = JSON.stringify({ schemaVersion: 1, name: 'kmm/faults', tag: 'v1', fsLayers: [], history: [] });
    const { access, ref } = await proxied(t, [
      { path: manifestPath, fault: { kind: 'status', status: 200, headers: { 'content-type': 'application/vnd.docker.distribution.manifest.v1+prettyjws' }, body } },
    ]);
    const client = newClient(t);
    const err = await registryError(t, client.resolveImage(ref(), access, AMD64), 'Invalid');
    t.match(err.message, /schema 1 manifest, which is deprecated and not supported/);
  });

  t.test('a manifest over maxManifestBytes → TooLarge', async (t) => {
    const client = newClient(t, { maxManifestBytes: 100 });
    const err = await registryError(t, client.resolveImage(refOf(plain, 'kmm/faults:v1'), plainAccess, AMD64), 'TooLarge');
    t.match(err.message, /over the limit of 100 bytes/);
  });

  t.test("the caller's abort rejects with its reason, also during a backoff and a blob stream", async (t) => {
    const client = newClient(t, { retries: 3, baseBackoffMs: 5_000, maxBackoffMs: 5_000 });
    const reason = new Error('caller gave up');
    await t.rejects(client.resolveImage(refOf(plain, 'kmm/faults:v1'), plainAccess, AMD64, { signal: AbortSignal.abort(reason) }), reason);

    const { access, ref } = await proxied(t, [
      { path: manifestPath, times: Infinity, fault: { kind: 'status', status: 503 } },
      { path: blobPath, fault: { kind: 'slow', chunkBytes: 1024, delayMs: 200 } },
    ]);
    const during = new AbortController();
    setTimeout(() => during.abort(reason), 200);
    const started = Date.now();
    await t.rejects(client.resolveImage(ref(), access, AMD64, { signal: during.signal }), reason);
    t.ok(Date.now() - started < 4_000, 'the backoff was cut short');

    const streaming = new AbortController();
    const stream = await client.openBlob(ref('big'), big.layers[0]!, access, { signal: streaming.signal });
    setTimeout(() => streaming.abort(reason), 300);
    await t.rejects(readAll(stream), reason);
  });
});

t.test('test images: layers round-trip with whiteouts, links and every compression; hostile material', { timeout: TEST_TIMEOUT }, async (t) => {
  const client = newClient(t);
  const image = await pushImage(plain, 'kmm/layers:v1', {
    mediaTypes: 'oci',
    platform: ARM64,
    layers: [
      { entries: [{ path: 'etc/foo', content: 'foo' }, { path: 'var/x/old', content: 'old' }], compression: 'gzip' },
      {
        entries: [{ whiteout: 'etc/foo' }, { opaque: 'var/x' }, { path: 'lib', linkTo: 'usr/lib' }, { path: 'bin/tool', content: '#!/bin/sh\n', mode: 0o755 }],
        compression: 'zstd',
      },
      { entries: [{ path: 'usr/lib/', type: 'directory' }, { path: 'usr/lib/hard', hardlinkTo: 'bin/tool' }], compression: 'none' },
    ],
  });
  const resolved = await client.resolveImage(image.ref, plainAccess, ARM64);
  t.same(
    resolved.layers.map((l) => l.mediaType),
    ['application/vnd.oci.image.layer.v1.tar+gzip', 'application/vnd.oci.image.layer.v1.tar+zstd', 'application/vnd.oci.image.layer.v1.tar'],
  );
  const decompressors = [gunzipSync, zstdDecompressSync, (b: Buffer) => b];
  const names: string[][] = [];
  for (let i = 0; i < resolved.layers.length; i++) {
    const data = decompressors[i]!(await readAll(await client.openBlob(image.ref, resolved.layers[i]!, plainAccess)));
    names.push(await tarNames(data));
  }
  t.same(names, [['etc/foo', 'var/x/old'], ['etc/.wh.foo', 'var/x/.wh..wh..opq', 'lib->usr/lib', 'bin/tool'], ['usr/lib/', 'usr/lib/hard=>bin/tool']]);
  const config = JSON.parse((await readAll(await client.openBlob(image.ref, resolved.config, plainAccess))).toString()) as { architecture: string; rootfs: { diff_ids: string[] } };
  t.equal(config.architecture, 'arm64');
  t.equal(config.rootfs.diff_ids.length, 3);

  const evil = await rawTar([{ header: { name: '../../etc/passwd', type: 'file', mode: 0o644 }, content: 'root::0:0::/:/bin/sh\n' }, { header: { name: 'escape', type: 'symlink', linkname: '/' } }]);
  t.same(await tarNames(evil), ['../../etc/passwd', 'escape->/'], 'hostile names are kept as given');

  const bomb = await gzipBomb({ uncompressedBytes: 64 * 1024 * 1024 });
  t.ok(bomb.data.length < bomb.tarBytes / 500, `a gzip bomb: ${bomb.data.length} bytes expand to ${bomb.tarBytes}`);
  const pushedBomb = await pushImage(plain, 'kmm/bomb:v1', { layers: [{ data: bomb.data, compression: 'gzip', diffId: bomb.diffId }] });
  t.equal((await client.resolveImage(pushedBomb.ref, plainAccess, AMD64)).layers[0]!.size, bomb.data.length);
});

async function tarNames(data: Buffer): Promise<string[]> {
  const extract = tar.extract();
  const names: string[] = [];
  const done = (async () => {
    for await (const entry of extract) {
      const h = entry.header;
      names.push(h.type === 'symlink' ? `${h.name}->${h.linkname}` : h.type === 'link' ? `${h.name}=>${h.linkname}` : h.name);
      entry.resume();
    }
  })();
  extract.end(data);
  await done;
  return names;
}
