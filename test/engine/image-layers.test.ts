/**
 * Reading files out of an image, appending a layer and pushing, against real registries (Debian's
 * docker-registry) and the real client: overlay semantics of the read, the built layer and
 * config, the mount path within a registry and the copy path across registries.
 */
import { gunzipSync } from 'node:zlib';
import t from 'tap';
import tar from 'tar-stream';
import { appendLayer, ImageLayersError, pushImage, readImageFiles, type ImageFile } from '../../src/engine/image-layers.ts';
import { parseImageReference } from '../../src/image/reference.ts';
import { createRegistryClient, MEDIA_TYPES, type RegistryHttpClient } from '../../src/registry/client.ts';
import { RegistryError, type Platform } from '../../src/registry/types.ts';
import { pushImage as pushFixture, rawTar, type MediaTypes } from '../helpers/images.ts';
import { accessFor, startFaultProxy, startRegistry, type TestRegistry } from '../helpers/registry.ts';

const K = '6.1.0-18-amd64';
const KDIR = `opt/lib/modules/${K}`;
const platform: Platform = { os: 'linux', architecture: 'amd64' };
const isKo = (p: string): boolean => p.endsWith('.ko');

function newClient(tt: { teardown: (fn: () => unknown) => void }): RegistryHttpClient {
  const client = createRegistryClient({ retries: 1, baseBackoffMs: 10, timeoutMs: 10_000 });
  tt.teardown(() => client.close());
  return client;
}

async function registryFor(tt: { teardown: (fn: () => unknown) => void }, options: Parameters<typeof startRegistry>[0] = {}): Promise<TestRegistry> {
  const registry = await startRegistry(options);
  tt.teardown(() => registry.stop());
  return registry;
}

function summary(files: readonly ImageFile[]): Record<string, string> {
  return Object.fromEntries(files.map((f) => [f.path, `${f.data.toString('utf8')} ${f.mode.toString(8)}`]));
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new Error('expected a rejection');
}

async function tarEntries(gz: Buffer): Promise<{ name: string; type: string; mode: number; mtime: number; uid: number; gid: number }[]> {
  const out: { name: string; type: string; mode: number; mtime: number; uid: number; gid: number }[] = [];
  const extract = tar.extract();
  const done = (async () => {
    for await (const entry of extract) {
      const h = entry.header;
      out.push({ name: h.name, type: h.type, mode: h.mode, mtime: h.mtime.getTime(), uid: h.uid, gid: h.gid });
      entry.resume();
    }
  })();
  extract.end(gunzipSync(gz));
  await done;
  return out;
}

/** A base image of three layers exercising whiteouts, opaque directories and links. */
async function overlayImage(registry: TestRegistry, repoTag: string, mediaTypes: MediaTypes = 'oci') {
  return pushFixture(registry, repoTag, {
    mediaTypes,
    layers: [
      {
        entries: [
          { path: `${KDIR}/a.ko`, content: 'a0' },
          { path: `${KDIR}/b.ko`, content: 'b0', mode: 0o640 },
          { path: `${KDIR}/gone.ko`, content: 'gone' },
          { path: 'opt/old/x.ko', content: 'x0' },
          { path: 'opt/keep/y.ko', content: 'y0' },
          { path: 'opt/thing.ko', content: 'a file, later a directory' },
          { path: 'etc/passwd', content: 'root:x:0:0::/root:/bin/sh\n' },
        ],
      },
      {
        compression: 'zstd',
        entries: [
          { whiteout: `${KDIR}/gone.ko` },
          { opaque: 'opt/old' },
          { path: 'opt/old/new.ko', content: 'new1' },
          { path: `${KDIR}/a.ko`, content: 'a1', mode: 0o600 },
          // To a lower layer's file that a higher layer deletes: the content as this layer sees it.
          { path: `${KDIR}/link.ko`, hardlinkTo: 'opt/keep/y.ko' },
          { path: `${KDIR}/sym.ko`, linkTo: 'a.ko' },
          { path: 'opt/thing.ko', type: 'directory' },
          { path: 'opt/thing.ko/inner.ko', content: 'inner1' },
        ],
      },
      {
        compression: 'none',
        entries: [
          { whiteout: 'opt/keep' },
          { path: 'opt/h/orig.ko', content: 'h2' },
          { path: 'opt/h/copy.ko', hardlinkTo: 'opt/h/orig.ko' },
        ],
      },
    ],
  });
}

t.test('the merged file system: upper versions win, whiteouts and opaque directories hide, links resolved', async (t) => {
  const registry = await registryFor(t);
  const client = newClient(t);
  const image = await overlayImage(registry, 'kmm/overlay:v1');
  const { resolved, files } = await readImageFiles(client, image.reference, accessFor(registry), platform, isKo);
  t.equal(resolved.digest, image.digest);
  t.same(summary(files), {
    '/opt/h/copy.ko': 'h2 644',
    '/opt/h/orig.ko': 'h2 644',
    [`/${KDIR}/a.ko`]: 'a1 600',
    [`/${KDIR}/b.ko`]: 'b0 640',
    [`/${KDIR}/link.ko`]: 'y0 644',
    '/opt/old/new.ko': 'new1 644',
    '/opt/thing.ko/inner.ko': 'inner1 644',
  });
  t.same(
    files.map((f) => f.path),
    [...files.map((f) => f.path)].sort(),
    'sorted by path',
  );
  const only = await readImageFiles(client, image.reference, accessFor(registry), platform, (p) => p === '/etc/passwd');
  t.same(summary(only.files), { '/etc/passwd': 'root:x:0:0::/root:/bin/sh\n 644' });
});

t.test('refusals: a path leaving the root, files over the limits; registry failures as RegistryErrors', async (t) => {
  const registry = await registryFor(t);
  const client = newClient(t);
  const access = accessFor(registry);
  const escape = await pushFixture(registry, 'kmm/escape:v1', {
    layers: [{ data: await rawTar([{ header: { name: '../../etc/evil.ko', type: 'file', mode: 0o644 }, content: 'x' }]), compression: 'none' }],
  });
  const err = await rejection(readImageFiles(client, escape.reference, access, platform, isKo));
  t.ok(err instanceof ImageLayersError && err.code === 'PathEscape', `PathEscape (${String(err)})`);
  t.match((err as Error).message, /has a path that leaves the root: \.\.\/\.\.\/etc\/evil\.ko/);

  const linkOut = await pushFixture(registry, 'kmm/escape:v2', {
    layers: [{ data: await rawTar([{ header: { name: 'opt/a.ko', type: 'link', linkname: '../../etc/shadow' } }]), compression: 'none' }],
  });
  t.match(await rejection(readImageFiles(client, linkOut.reference, access, platform, isKo)), { code: 'PathEscape', message: /hard link that leaves the root/ });

  const big = await pushFixture(registry, 'kmm/big:v1', {
    layers: [
      {
        entries: [
          { path: 'opt/a.ko', content: Buffer.alloc(3000, 1) },
          { path: 'opt/b.ko', content: Buffer.alloc(3000, 2) },
          { path: 'opt/huge.bin', content: Buffer.alloc(100_000, 3) },
        ],
      },
    ],
  });
  t.match(await rejection(readImageFiles(client, big.reference, access, platform, isKo, { maxFileBytes: 2000 })), {
    code: 'FileTooLarge',
    message: /file \/opt\/a\.ko in layer sha256:[0-9a-f]{64} of image .* is 2\.9 KiB, over the limit of 2000 B|file \/opt\/a\.ko .* over the limit/,
  });
  t.match(await rejection(readImageFiles(client, big.reference, access, platform, isKo, { maxTotalBytes: 5000 })), { code: 'TotalTooLarge' });
  const fine = await readImageFiles(client, big.reference, access, platform, isKo, { maxFileBytes: 4000, maxTotalBytes: 6000 });
  t.equal(fine.files.length, 2, 'an unwanted large file costs nothing against the limits');

  const absent = await rejection(readImageFiles(client, `${registry.host}/kmm/absent:v1`, access, platform, isKo));
  t.ok(absent instanceof RegistryError && absent.code === 'NotFound', 'NotFound');
});

t.test('append a layer and push within the registry: base layers mounted, not copied', async (t) => {
  const registry = await registryFor(t, { auth: 'token' });
  // Through a recording proxy, to see which requests the push made.
  const proxy = await startFaultProxy(registry, []);
  t.teardown(() => proxy.stop());
  const client = newClient(t);
  const access = accessFor(proxy);
  const base = await overlayImage(proxy, 'kmm/overlay:unsigned');
  const { resolved } = await readImageFiles(client, base.reference, access, platform, isKo);
  const files: ImageFile[] = [
    { path: `/${KDIR}/a.ko`, data: Buffer.from('a-signed'), mode: 0o600 },
    { path: `/${KDIR}/extra/new.ko`, data: Buffer.from('new-signed'), mode: 0o644 },
  ];
  const built = await appendLayer(client, { image: base.reference, access, resolved }, files, { history: 'kmm-preflight: signed a.ko, new.ko' });
  t.equal(built.mediaType, MEDIA_TYPES.ociManifest);
  t.equal(built.layer.descriptor.mediaType, 'application/vnd.oci.image.layer.v1.tar+gzip');
  const again = await appendLayer(client, { image: base.reference, access, resolved }, [...files].reverse(), { history: 'kmm-preflight: signed a.ko, new.ko' });
  t.equal(again.digest, built.digest, 'deterministic: the same files give the same image');

  const entries = await tarEntries(built.layer.data);
  t.same(
    entries.map((e) => `${e.type} ${e.name} ${e.mode.toString(8)}`),
    [
      'directory opt/ 755',
      'directory opt/lib/ 755',
      'directory opt/lib/modules/ 755',
      `directory ${KDIR}/ 755`,
      `file ${KDIR}/a.ko 600`,
      `directory ${KDIR}/extra/ 755`,
      `file ${KDIR}/extra/new.ko 644`,
    ],
    'parent directories, sorted',
  );
  t.ok(entries.every((e) => e.mtime === 0 && e.uid === 0 && e.gid === 0), 'time 0, owned by root');

  const config = JSON.parse(built.config.toString('utf8')) as { rootfs: { diff_ids: string[] }; history: { created_by: string }[]; architecture: string };
  const baseConfig = JSON.parse(base.configBytes.toString('utf8')) as { rootfs: { diff_ids: string[] }; history: unknown[] };
  t.same(config.rootfs.diff_ids, [...baseConfig.rootfs.diff_ids, built.layer.diffId]);
  t.equal(config.history.length, baseConfig.history.length + 1);
  t.equal(config.history.at(-1)!.created_by, 'kmm-preflight: signed a.ko, new.ko');
  t.equal(config.architecture, 'amd64', 'the rest of the config is kept');

  const before = proxy.requests.length;
  const digest = await pushImage(client, built, `${proxy.host}/kmm/overlay-signed:v1`, access);
  t.equal(digest, built.digest);
  const pushRequests = proxy.requests.slice(before);
  // Each digest once, after the 401 that asks for a token (for pull on the base, push on the target).
  const mounted = new Set(pushRequests.filter((r) => r.method === 'POST' && r.path.includes('mount=')).map((r) => new URL(r.path, 'http://x').searchParams.get('mount')));
  t.same([...mounted].sort(), base.layers.map((l) => l.digest).sort(), 'every base layer mounted');
  t.notOk(pushRequests.some((r) => r.method === 'GET' && r.path.includes('/blobs/')), 'no blob is downloaded');
  t.notOk(pushRequests.some((r) => r.method === 'PUT' && base.layers.some((l) => r.path.includes(l.digest.slice(7)))), 'no base layer is uploaded');

  const pushed = await readImageFiles(client, `${proxy.host}/kmm/overlay-signed:v1`, access, platform, isKo);
  t.equal(pushed.resolved.digest, digest);
  t.equal(pushed.resolved.mediaType, MEDIA_TYPES.ociManifest);
  t.same(pushed.resolved.layers, [...resolved.layers, built.layer.descriptor]);
  const s = summary(pushed.files);
  t.equal(s[`/${KDIR}/a.ko`], 'a-signed 600', 'the new layer wins');
  t.equal(s[`/${KDIR}/extra/new.ko`], 'new-signed 644');
  t.equal(s[`/${KDIR}/b.ko`], 'b0 640', 'the base shows through');

  // Pushing to the base's own repository moves no base layer at all.
  const beforeSame = proxy.requests.length;
  await pushImage(client, built, `${proxy.host}/kmm/overlay:signed`, access);
  t.notOk(proxy.requests.slice(beforeSame).some((r) => r.path.includes('mount=')), 'nothing to mount in the same repository');
});

t.test('append a layer and push to another registry: base layers streamed across, Docker media types kept', async (t) => {
  const source = await registryFor(t);
  const destination = await registryFor(t, { auth: 'htpasswd' });
  const client = newClient(t);
  const base = await overlayImage(source, 'kmm/overlay:v1', 'docker');
  const { resolved } = await readImageFiles(client, base.reference, accessFor(source), platform, isKo);
  t.equal(resolved.mediaType, MEDIA_TYPES.dockerManifest);
  const built = await appendLayer(client, { image: base.reference, access: accessFor(source), resolved }, [
    { path: `/${KDIR}/b.ko`, data: Buffer.from('b-signed'), mode: 0o640 },
  ]);
  t.equal(built.mediaType, MEDIA_TYPES.dockerManifest);
  t.equal(built.layer.descriptor.mediaType, 'application/vnd.docker.image.rootfs.diff.tar.gzip');
  t.equal(built.configDescriptor.mediaType, 'application/vnd.docker.container.image.v1+json');
  t.equal(JSON.parse(built.config.toString('utf8')).history.at(-1).created_by, 'kmm-preflight: signed 1 file');

  const target = `${destination.host}/drivers/overlay:signed`;
  const refused = await rejection(pushImage(client, built, target, { insecure: true }, { baseAccess: accessFor(source) }));
  t.ok(refused instanceof RegistryError && refused.code === 'Unauthorized', 'no push credentials: Unauthorized');
  const digest = await pushImage(client, built, target, accessFor(destination), { baseAccess: accessFor(source) });
  const pushed = await readImageFiles(client, target, accessFor(destination), platform, isKo);
  t.equal(pushed.resolved.digest, digest);
  t.equal(pushed.resolved.mediaType, MEDIA_TYPES.dockerManifest);
  t.equal(pushed.resolved.layers.length, base.layers.length + 1);
  t.equal(summary(pushed.files)[`/${KDIR}/b.ko`], 'b-signed 640');
  t.equal(summary(pushed.files)[`/${KDIR}/a.ko`], 'a1 600');

  // A second push finds every blob there (HEAD) and downloads nothing.
  const received = client.bytesReceived;
  t.equal(await pushImage(client, built, target, accessFor(destination), { baseAccess: accessFor(source) }), digest);
  t.ok(client.bytesReceived - received < 4096, 'no layer downloaded again');
});

t.test('a registry that refuses the mount: the base layers are copied within it', async (t) => {
  const registry = await registryFor(t);
  const proxy = await startFaultProxy(registry, [
    { method: 'POST', path: 'mount=', times: Infinity, fault: { kind: 'status', status: 401, body: '{"errors":[{"code":"UNAUTHORIZED"}]}' } },
  ]);
  t.teardown(() => proxy.stop());
  const client = newClient(t);
  const access = accessFor(proxy);
  const base = await overlayImage(proxy, 'kmm/overlay:unsigned');
  const { resolved } = await readImageFiles(client, base.reference, access, platform, isKo);
  const built = await appendLayer(client, { image: base.reference, access, resolved }, [{ path: `/${KDIR}/a.ko`, data: Buffer.from('a-signed'), mode: 0o644 }]);
  const before = proxy.requests.length;
  const digest = await pushImage(client, built, `${proxy.host}/kmm/copied:v1`, access);
  const requests = proxy.requests.slice(before);
  t.equal(requests.filter((r) => r.fault === 'status').length, base.layers.length, 'a mount tried per layer');
  t.equal(requests.filter((r) => r.method === 'GET' && r.path.includes('/v2/kmm/overlay/blobs/')).length, base.layers.length, 'then each layer read');
  const pushed = await readImageFiles(client, `${proxy.host}/kmm/copied:v1`, access, platform, isKo);
  t.equal(pushed.resolved.digest, digest);
  t.equal(summary(pushed.files)[`/${KDIR}/a.ko`], 'a-signed 644');
});

t.test('appendLayer and pushImage refuse bad paths and targets', async (t) => {
  const registry = await registryFor(t);
  const client = newClient(t);
  const access = accessFor(registry);
  const base = await pushFixture(registry, 'kmm/base:v1', { layers: [{ entries: [{ path: 'etc/os-release', content: 'ID=debian\n' }] }] });
  const resolved = await client.resolveImage(parseImageReference(base.reference), access, platform);
  const b = { image: base.reference, access, resolved };
  const data = Buffer.from('x');
  t.match(await rejection(appendLayer(client, b, [{ path: '/opt/../../etc/x.ko', data, mode: 0o644 }])), { code: 'PathEscape', message: /leaves the root/ });
  t.match(await rejection(appendLayer(client, b, [{ path: '/', data, mode: 0o644 }])), { code: 'InvalidFile' });
  t.match(
    await rejection(appendLayer(client, b, [{ path: '/opt/a.ko', data, mode: 0o644 }, { path: 'opt//a.ko', data, mode: 0o644 }])),
    { code: 'InvalidFile', message: /twice/ },
  );
  const built = await appendLayer(client, b, [{ path: '/opt/a.ko', data, mode: 0o644 }]);
  t.match(await rejection(pushImage(client, built, `${registry.host}/kmm/x@sha256:${'0'.repeat(64)}`, access)), { code: 'InvalidTarget', message: /needs a tag/ });
  t.match(await rejection(pushImage(client, built, 'Not A Reference', access)), { code: 'InvalidTarget' });
});
