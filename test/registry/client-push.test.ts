/**
 * Cross-repository blob mounts against a real registry (Debian's docker-registry): mounted when
 * the source repository has the blob, an upload started and cancelled when it does not, under
 * no auth, Basic auth and token auth (one token for pull on the source and push on the target).
 */
import t from 'tap';
import { parseImageReference, type ImageReference } from '../../src/image/reference.ts';
import { createRegistryClient, type RegistryHttpClient } from '../../src/registry/client.ts';
import { RegistryError, type Descriptor } from '../../src/registry/types.ts';
import { pushImage, sha256 } from '../helpers/images.ts';
import { accessFor, startFaultProxy, startRegistry, type TestRegistry } from '../helpers/registry.ts';

function newClient(tt: { teardown: (fn: () => unknown) => void }): RegistryHttpClient {
  const client = createRegistryClient({ retries: 1, baseBackoffMs: 10, timeoutMs: 10_000 });
  tt.teardown(() => client.close());
  return client;
}

function refOf(registry: Pick<TestRegistry, 'host'>, repoTag: string): ImageReference {
  return parseImageReference(`${registry.host}/${repoTag}`);
}

async function readBlob(client: RegistryHttpClient, ref: ImageReference, d: Descriptor, registry: TestRegistry): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of await client.openBlob(ref, d, accessFor(registry))) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

for (const auth of ['none', 'htpasswd', 'token'] as const) {
  t.test(`a blob of another repository is mounted, not uploaded (auth: ${auth})`, async (t) => {
    const registry = await startRegistry({ auth });
    t.teardown(() => registry.stop());
    const client = newClient(t);
    const base = await pushImage(registry, 'kmm/base:v1', { layers: [{ entries: [{ path: 'opt/a', content: `layer of ${auth}` }] }] });
    const layer = base.layers[0]!;
    const target = refOf(registry, 'kmm/signed:v1');
    t.equal(await client.mountBlob(target, base.ref, layer.digest, accessFor(registry)), true, 'mounted');
    t.same(await readBlob(client, target, layer, registry), base.layerData[0], 'the target repository serves the blob');
  });
}

t.test('a blob the source does not have: the upload started instead is cancelled, and false', async (t) => {
  const registry = await startRegistry();
  t.teardown(() => registry.stop());
  const proxy = await startFaultProxy(registry, []);
  t.teardown(() => proxy.stop());
  const client = newClient(t);
  const base = await pushImage(proxy, 'kmm/base:v1', { layers: [{ entries: [{ path: 'opt/a', content: 'a' }] }] });
  const absent = sha256('not pushed anywhere');
  const mounted = await client.mountBlob(refOf(proxy, 'kmm/signed:v1'), base.ref, absent, accessFor(proxy));
  t.equal(mounted, false);
  const calls = proxy.requests.filter((r) => r.path.includes('/v2/kmm/signed/'));
  t.equal(calls.length, 2, 'a POST and a DELETE');
  t.match(calls[0], { method: 'POST', path: /\/blobs\/uploads\/\?mount=sha256%3A[0-9a-f]{64}&from=kmm%2Fbase$/ });
  t.match(calls[1], { method: 'DELETE', path: /\/v2\/kmm\/signed\/blobs\/uploads\/[0-9a-f-]+/ });
});

t.test('a mount is refused without push credentials, and across registries', async (t) => {
  const registry = await startRegistry({ auth: 'htpasswd' });
  t.teardown(() => registry.stop());
  const client = newClient(t);
  const base = await pushImage(registry, 'kmm/base:v1', { layers: [{ entries: [{ path: 'opt/a', content: 'a' }] }] });
  const digest = base.layers[0]!.digest;
  const anonymous = { insecure: true };
  const refused = await client.mountBlob(refOf(registry, 'kmm/signed:v1'), base.ref, digest, anonymous).catch((e: unknown) => e);
  t.ok(refused instanceof RegistryError && refused.code === 'Unauthorized', `Unauthorized (${String(refused)})`);
  const other = parseImageReference('registry.example.com/kmm/base:v1');
  const across = await client.mountBlob(refOf(registry, 'kmm/signed:v1'), other, digest, accessFor(registry)).catch((e: unknown) => e);
  t.ok(across instanceof RegistryError && across.code === 'Invalid', 'Invalid');
  t.match((across as Error).message, /from another registry \(registry\.example\.com\)/);
});
