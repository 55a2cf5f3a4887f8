/**
 * The Sign stage against a real registry (Debian's docker-registry), the real client, keys made
 * by openssl and modules built by gcc: the signed image passes the Image stage and its modules
 * verify with our verifier and with Debian's modinfo; each failure has its code.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t, { type Test } from 'tap';
import { readImageFiles } from '../../src/engine/image-layers.ts';
import { createImageStage } from '../../src/engine/image-stage.ts';
import { createMemoryLayerCache } from '../../src/engine/layer-cache.ts';
import { createSignStage, type SignStageInput, type SignStageOutcome } from '../../src/engine/sign-stage.ts';
import { parseImageReference } from '../../src/image/reference.ts';
import { createRegistryClient } from '../../src/registry/client.ts';
import { RegistryError, type Platform } from '../../src/registry/types.ts';
import { verifyModuleFile } from '../../src/sign/module-signature.ts';
import { ensureDebianBinary } from '../helpers/debian.ts';
import { pushImage } from '../helpers/images.ts';
import { buildModuleObject, buildModuleXz, kmodModinfo, writeTemp } from '../helpers/kmod-fixtures.ts';
import { accessFor, startFaultProxy, startRegistry } from '../helpers/registry.ts';
import { freePort } from '../helpers/server.ts';

const run = promisify(execFile);
const K = '6.1.0-18-amd64';
const VERMAGIC = `${K} SMP preempt mod_unload modversions`;
const KDIR = `opt/lib/modules/${K}`;
const platform: Platform = { os: 'linux', architecture: 'amd64' };
const MARKER = '~Module signature appended~\n';

interface KeyPair {
  readonly key: Buffer;
  readonly certificate: Buffer;
}

/** `openssl req -x509 -new -nodes -sha256 -days 3650 -batch -subj /CN=<cn>`, as KMM's docs make a signing key. */
async function makeKey(dir: string, cn: string): Promise<KeyPair> {
  const openssl = await ensureDebianBinary('openssl', 'openssl');
  const key = join(dir, `${cn}.key`);
  const cert = join(dir, `${cn}.pem`);
  await run(openssl, ['req', '-x509', '-new', '-nodes', '-sha256', '-days', '3650', '-batch', '-subj', `/CN=${cn}`, '-keyout', key, '-out', cert]);
  return { key: await readFile(key), certificate: await readFile(cert) };
}

const keyDir = await mkdtemp(join(tmpdir(), 'kmm-sign-stage-'));
t.teardown(() => rm(keyDir, { recursive: true, force: true }));
const ours = await makeKey(keyDir, 'test');
const theirs = await makeKey(keyDir, 'other');

const registry = await startRegistry();
t.teardown(() => registry.stop());
const client = createRegistryClient({ retries: 1, baseBackoffMs: 10, timeoutMs: 10_000 });
t.teardown(() => client.close());
const access = accessFor(registry);
const stage = createSignStage({ registry: client });

const gpuKo = await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC });
const helperXz = await buildModuleXz({ name: 'gpu-helper', vermagic: VERMAGIC });

/** A distribution base layer and a module layer with gpu.ko and gpu-helper.ko.xz. */
const unsigned = await pushImage(registry, 'kmm/gpu:unsigned', {
  layers: [
    { entries: [{ path: 'etc/os-release', content: 'ID=debian\n' }, { path: 'usr/bin/busybox', content: Buffer.alloc(50_000, 0x90) }] },
    {
      entries: [
        { path: `${KDIR}/extra/gpu.ko`, content: gpuKo, mode: 0o644 },
        { path: `${KDIR}/extra/gpu-helper.ko.xz`, content: helperXz, mode: 0o640 },
        { path: `${KDIR}/modules.dep`, content: 'extra/gpu.ko: extra/gpu-helper.ko.xz\nextra/gpu-helper.ko.xz:\n' },
        { path: 'opt/firmware/gpu.bin', content: 'firmware' },
      ],
    },
  ],
});

function input(over: Partial<SignStageInput> = {}): SignStageInput {
  return {
    inputImage: unsigned.reference,
    inputAccess: access,
    outputImage: `${registry.host}/kmm/gpu:${K}`,
    outputAccess: access,
    push: true,
    filesToSign: [],
    dirName: '/opt',
    moduleName: 'gpu',
    kernel: K,
    key: ours.key,
    certificate: ours.certificate,
    keySecret: 'drivers/signing-key',
    certSecret: 'drivers/signing-cert',
    platform,
    ...over,
  };
}

function check(t: Test, outcome: SignStageOutcome, status: SignStageOutcome['status'], code: string, reason?: RegExp): void {
  t.equal(outcome.status, status, `status (${outcome.reason})`);
  t.equal(outcome.code, code, 'code');
  if (reason) t.match(outcome.reason, reason, 'reason');
}

async function filesOf(image: string) {
  return readImageFiles(client, image, access, platform, (p) => p.includes('/lib/modules/'));
}

t.test('signs the module files, pushes, and the image passes the Image stage; modinfo sees the signer', async (t) => {
  const outcome = await stage.run(input());
  check(
    t,
    outcome,
    'True',
    'Signed',
    new RegExp(
      `^signed 2 files \\(/${KDIR}/extra/gpu-helper\\.ko\\.xz, /${KDIR}/extra/gpu\\.ko\\) with key [0-9a-f:]+ \\(test, sha256\\) and pushed ${registry.host}/kmm/gpu:${K}@sha256:[0-9a-f]{64}$`,
      'i',
    ),
  );
  t.same(outcome.signedFiles, [`/${KDIR}/extra/gpu-helper.ko.xz`, `/${KDIR}/extra/gpu.ko`]);
  const output = `${registry.host}/kmm/gpu:${K}`;

  const image = await createImageStage({ registry: client, cache: createMemoryLayerCache() }).run({
    image: output,
    moduleName: 'gpu',
    dirName: '/opt',
    kernel: K,
    access,
    platform,
  });
  t.match(image, { status: 'True', code: 'Verified' }, image.reason);

  const { resolved, files } = await filesOf(output);
  t.equal(resolved.digest, outcome.digest);
  t.equal(resolved.layers.length, unsigned.layers.length + 1, 'one new layer over the unsigned image');
  const byPath = new Map(files.map((f) => [f.path, f]));
  const ko = byPath.get(`/${KDIR}/extra/gpu.ko`)!;
  const xz = byPath.get(`/${KDIR}/extra/gpu-helper.ko.xz`)!;
  const verified = await verifyModuleFile(ko.data, ko.path, ours.certificate, { maxBytes: 1 << 24 });
  t.match(verified, { signer: 'test', hashAlgorithm: 'sha256' });
  t.match(outcome.reason, `with key ${verified.keyId} (test, sha256)`, 'the reason names the key id the signature carries');
  t.equal(ko.data.subarray(0, gpuKo.length).compare(gpuKo), 0, 'the module itself is unchanged, the signature appended');
  t.equal(xz.data.subarray(0, 6).toString('hex'), 'fd377a585a00', 'the .ko.xz is still xz');
  t.equal(xz.mode, 0o640, 'modes kept');
  t.equal((await verifyModuleFile(xz.data, xz.path, ours.certificate, { maxBytes: 1 << 24 })).signer, 'test');
  t.equal(byPath.get(`/${KDIR}/modules.dep`)?.data.toString('utf8'), 'extra/gpu.ko: extra/gpu-helper.ko.xz\nextra/gpu-helper.ko.xz:\n', 'other files as they were');

  for (const f of [ko, xz]) {
    const tmp = await writeTemp(f.path.slice(f.path.lastIndexOf('/') + 1), f.data);
    try {
      t.equal(await kmodModinfo('signer', tmp.path), 'test', `modinfo -F signer ${f.path}`);
      t.equal(await kmodModinfo('sig_hashalgo', tmp.path), 'sha256');
    } finally {
      await tmp.cleanup();
    }
  }

  const again = await stage.run(input());
  t.equal(again.digest, outcome.digest, 'signing again gives the same image (RSA signatures and the layer are deterministic)');
});

t.test('filesToSign: relative patterns are under dirName, globs match; a pattern matching nothing is refused', async (t) => {
  const outcome = await stage.run(input({ filesToSign: [`lib/modules/${K}/extra/gpu.ko`], outputImage: `${registry.host}/kmm/gpu:one` }));
  check(t, outcome, 'True', 'Signed', /^signed 1 file \(/);
  t.same(outcome.signedFiles, [`/${KDIR}/extra/gpu.ko`]);
  const { files } = await filesOf(`${registry.host}/kmm/gpu:one`);
  const helper = files.find((f) => f.path.endsWith('gpu-helper.ko.xz'))!;
  t.equal(helper.data.compare(helperXz), 0, 'a file no pattern names stays unsigned');

  const glob = await stage.run(input({ filesToSign: ['/opt/lib/modules/*/extra/*.ko*'], push: false }));
  t.same(glob.signedFiles, [`/${KDIR}/extra/gpu-helper.ko.xz`, `/${KDIR}/extra/gpu.ko`]);

  check(
    t,
    await stage.run(input({ filesToSign: [`/${KDIR}/extra/gpu.ko`, `/${KDIR}/extra/nic.ko`, '/opt/firmware/*'] })),
    'False',
    'FileToSignMissing',
    new RegExp(`^sign\\.filesToSign patterns /${KDIR}/extra/nic\\.ko, /opt/firmware/\\* match no kernel module file .* in image ${unsigned.reference.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`),
  );
  const empty = await pushImage(registry, 'kmm/empty:v1', { layers: [{ entries: [{ path: 'etc/os-release', content: 'ID=debian\n' }] }] });
  check(t, await stage.run(input({ inputImage: empty.reference })), 'False', 'FileToSignMissing', new RegExp(`no kernel module file .* under /${KDIR}/ to sign`));
});

t.test('a key that does not match the certificate: KeyMismatch naming both Secrets', async (t) => {
  check(
    t,
    await stage.run(input({ key: theirs.key })),
    'False',
    'KeyMismatch',
    /^the private key in Secret drivers\/signing-key does not match the certificate in Secret drivers\/signing-cert: /,
  );
  check(t, await stage.run(input({ certificate: Buffer.from('not a certificate') })), 'False', 'InvalidCertificate', /certificate in Secret drivers\/signing-cert cannot be used/);
});

t.test('pushBuiltImage false: signed and verified, and nothing is pushed', async (t) => {
  const proxy = await startFaultProxy(registry, []);
  t.teardown(() => proxy.stop());
  const viaProxy = createSignStage({ registry: client });
  const image = `${proxy.host}/kmm/gpu:unsigned`;
  const output = `${proxy.host}/kmm/never:${K}`;
  const outcome = await viaProxy.run(input({ inputImage: image, inputAccess: accessFor(proxy), outputImage: output, outputAccess: accessFor(proxy), push: false }));
  check(t, outcome, 'True', 'Signed', new RegExp(`^signed 2 files .* over image ${proxy.host}/kmm/gpu:unsigned, verified, not pushed \\(pushBuiltImage is false\\)$`));
  t.equal(outcome.digest, undefined);
  t.same(
    proxy.requests.filter((r) => r.method !== 'GET'),
    [],
    'only GETs: no upload, no mount, no manifest',
  );
  const missing = await client.resolveImage(parseImageReference(output), access, platform).catch((e: unknown) => e);
  t.ok(missing instanceof RegistryError && missing.code === 'NotFound', 'the target has no manifest');
  const tags = await fetch(`${registry.url}/v2/kmm/never/tags/list`);
  t.equal(tags.status, 404, 'the target repository does not exist');
});

t.test('an already signed image is signed again, once, with the new key', async (t) => {
  const other = createSignStage({ registry: client });
  const first = await other.run(input({ key: theirs.key, certificate: theirs.certificate, outputImage: `${registry.host}/kmm/gpu:signed-other` }));
  check(t, first, 'True', 'Signed', /\(other, sha256\)/);
  const second = await stage.run(input({ inputImage: `${registry.host}/kmm/gpu:signed-other`, outputImage: `${registry.host}/kmm/gpu:resigned` }));
  check(t, second, 'True', 'Signed', /\(test, sha256\)/);
  const { resolved, files } = await filesOf(`${registry.host}/kmm/gpu:resigned`);
  t.equal(resolved.layers.length, unsigned.layers.length + 2, 'a layer per signing');
  t.equal(files.filter((x) => /\.ko(\.xz)?$/.test(x.path)).length, 2);
  for (const f of files.filter((x) => /\.ko(\.xz)?$/.test(x.path))) {
    if (f.path.endsWith('.ko')) t.equal(f.data.toString('latin1').split(MARKER).length - 1, 1, `${f.path}: one signature`);
    t.equal((await verifyModuleFile(f.data, f.path, ours.certificate, { maxBytes: 1 << 24 })).signer, 'test');
    t.match(await verifyModuleFile(f.data, f.path, theirs.certificate, { maxBytes: 1 << 24 }).catch((e: unknown) => e), { code: 'WrongSigner' });
  }
});

t.test('the Module\'s own module must be there, built for the kernel', async (t) => {
  check(t, await stage.run(input({ moduleName: 'nic' })), 'False', 'ModuleNotFound', new RegExp(`^module nic is not in /${KDIR}/ of image .* \\(the files to sign are `));
  t.equal((await stage.run(input({ moduleName: 'gpu_helper', push: false }))).code, 'Signed', '- and _ are the same');
  const K2 = '6.1.0-17-amd64';
  const stale = await pushImage(registry, 'kmm/gpu:stale', {
    layers: [{ entries: [{ path: `opt/lib/modules/${K2}/extra/gpu.ko`, content: gpuKo }] }],
  });
  check(
    t,
    await stage.run(input({ inputImage: stale.reference, kernel: K2 })),
    'False',
    'VermagicMismatch',
    new RegExp(`^module gpu in image .* is not built for kernel ${K2}: /opt/lib/modules/${K2}/extra/gpu\\.ko was built for ${K}$`),
  );
});

t.test('registry failures: the unsigned image missing or unreadable, the push refused', async (t) => {
  check(t, await stage.run(input({ inputImage: `${registry.host}/kmm/absent:v1` })), 'False', 'UnsignedImageNotFound', new RegExp(`^unsigned image ${registry.host}/kmm/absent:v1 not found: `));

  const secured = await startRegistry({ auth: 'htpasswd' });
  t.teardown(() => secured.stop());
  const securedImage = await pushImage(secured, 'kmm/gpu:unsigned', { layers: [{ entries: [{ path: `${KDIR}/extra/gpu.ko`, content: gpuKo }] }] });
  check(t, await stage.run(input({ inputImage: securedImage.reference, inputAccess: { insecure: true } })), 'False', 'UnsignedImageUnauthorized');
  check(
    t,
    await stage.run(input({ outputImage: `${secured.host}/kmm/gpu:signed`, outputAccess: { insecure: true } })),
    'False',
    'PushUnauthorized',
    new RegExp(`^cannot push the signed image to ${secured.host}/kmm/gpu:signed: `),
  );
  // Across registries, with each side's credentials: the base layers are copied.
  const across = await stage.run(input({ outputImage: `${secured.host}/kmm/gpu:signed`, outputAccess: accessFor(secured) }));
  check(t, across, 'True', 'Signed');

  const downClient = createRegistryClient({ retries: 0, timeoutMs: 2000 });
  t.teardown(() => downClient.close());
  const down = createSignStage({ registry: downClient });
  const port = await freePort();
  check(t, await down.run(input({ inputImage: `127.0.0.1:${port}/kmm/gpu:v1`, inputAccess: { insecure: true } })), 'Error', 'RegistryUnreachable', /connection was refused/);
});

t.test('an aborted run rejects with the reason', async (t) => {
  const controller = new AbortController();
  const reason = new Error('shutting down');
  controller.abort(reason);
  await t.rejects(stage.run(input({ signal: controller.signal })), reason);
});
