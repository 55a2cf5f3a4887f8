import t, { type Test } from 'tap';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createImageStage, type ImageStageLimits } from '../../src/engine/image-stage.ts';
import { createDiskLayerCache, createMemoryLayerCache, type LayerCache } from '../../src/engine/layer-cache.ts';
import type { ImageStageInput, StageOutcome } from '../../src/engine/types.ts';
import type { RegistryErrorCode } from '../../src/registry/types.ts';
import {
  buildLayer,
  buildModuleObject,
  buildModuleXz,
  buildModuleZst,
  FakeRegistry,
  gzipBombBlob,
  type Blob,
  type FileSpec,
  type LayerCompression,
} from '../helpers/kmod-fixtures.ts';

const REG = 'registry.test';
const K = '6.1.0-18-amd64';
const VERMAGIC = `${K} SMP preempt mod_unload modversions`;
const platform = { os: 'linux', architecture: 'amd64' };

function setup(limits: Partial<ImageStageLimits> = {}, cache: LayerCache = createMemoryLayerCache()) {
  const registry = new FakeRegistry();
  const stage = createImageStage({ registry, cache, limits });
  return { registry, cache, stage };
}

function input(image: string, over: Partial<ImageStageInput> = {}): ImageStageInput {
  return { image: `${REG}/${image}`, moduleName: 'gpu', dirName: '/opt', kernel: K, access: {}, platform, ...over };
}

/** A base layer like a distribution's: nothing about modules. */
function baseLayer(extra: FileSpec[] = []): Promise<Blob> {
  return buildLayer([
    { path: 'etc/', type: 'dir' },
    { path: 'etc/os-release', content: 'ID=debian\nVERSION_ID="12"\n' },
    { path: 'usr/bin/', type: 'dir' },
    { path: 'usr/bin/busybox', content: Buffer.alloc(200_000, 0x90) },
    ...extra,
  ]);
}

interface ModuleLayerOptions {
  readonly name?: string;
  readonly file?: string;
  readonly vermagic?: string;
  readonly kernel?: string;
  readonly root?: string;
  readonly sub?: string;
  readonly dep?: string | false;
  readonly compression?: LayerCompression;
  readonly moduleCompression?: 'xz' | 'zst';
  readonly extra?: FileSpec[];
}

/** A layer holding `<root>/lib/modules/<kernel>/<sub>/<file>` and a modules.dep listing it. */
async function moduleLayer(o: ModuleLayerOptions = {}): Promise<Blob> {
  const name = o.name ?? 'gpu';
  const kernel = o.kernel ?? K;
  const spec = { name, vermagic: o.vermagic ?? VERMAGIC, depends: [] };
  const suffix = o.moduleCompression ? `.${o.moduleCompression}` : '';
  const file = o.file ?? `${name}.ko${suffix}`;
  const content =
    o.moduleCompression === 'xz' ? await buildModuleXz(spec) : o.moduleCompression === 'zst' ? await buildModuleZst(spec) : await buildModuleObject(spec);
  const dir = `${o.root ?? 'opt'}/lib/modules/${kernel}`;
  const rel = `${o.sub ?? 'extra'}/${file}`;
  const files: FileSpec[] = [{ path: `${dir}/${rel}`, content }];
  if (o.dep !== false) files.push({ path: `${dir}/modules.dep`, content: o.dep ?? `${rel}:\n` });
  return buildLayer([...files, ...(o.extra ?? [])], o.compression ?? 'gzip');
}

async function check(t: Test, outcome: StageOutcome, status: StageOutcome['status'], code: string, reason?: string | RegExp): Promise<void> {
  t.equal(outcome.status, status, `status (${outcome.reason})`);
  t.equal(outcome.code, code, 'code');
  if (typeof reason === 'string') t.equal(outcome.reason, reason, 'reason');
  else if (reason) t.match(outcome.reason, reason, 'reason');
}

t.test('module in the top layer: verified, and the lower layers are never opened', async (t) => {
  const { registry, stage } = setup();
  const base = await baseLayer();
  const top = await moduleLayer();
  registry.addImage(`${REG}/drivers/gpu:1`, { layers: [base, top] });
  const outcome = await stage.run(input('drivers/gpu:1'));
  await check(t, outcome, 'True', 'Verified', `module gpu found in image ${REG}/drivers/gpu:1 for kernel ${K} (extra/gpu.ko, vermagic ok)`);
  t.same(registry.opened, [top.descriptor.digest], 'top-layer decision: the base layer blob is not opened');
  t.equal(registry.bytesReceived, top.data!.length);

  // As docker and buildah write layers: with an entry for every parent directory.
  const dir = `opt/lib/modules/${K}`;
  const parents = ['opt/', 'opt/lib/', 'opt/lib/modules/', `${dir}/`, `${dir}/extra/`].map((path) => ({ path, type: 'dir' as const }));
  const withDirs = await buildLayer([
    ...parents,
    { path: `${dir}/extra/gpu.ko`, content: await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC }) },
    { path: `${dir}/modules.dep`, content: 'extra/gpu.ko:\n' },
  ]);
  registry.addImage(`${REG}/drivers/gpu:2`, { layers: [base, withDirs] });
  registry.resetCounters();
  await check(t, await stage.run(input('drivers/gpu:2')), 'True', 'Verified');
  t.same(registry.opened, [withDirs.descriptor.digest]);
});

t.test('module in a lower layer', async (t) => {
  const { registry, stage } = setup();
  const layers = [await baseLayer(), await moduleLayer(), await buildLayer([{ path: 'etc/motd', content: 'hello\n' }])];
  registry.addImage(`${REG}/drivers/gpu:lower`, { layers });
  await check(t, await stage.run(input('drivers/gpu:lower')), 'True', 'Verified');
  t.same(registry.opened, [layers[2]!.descriptor.digest, layers[1]!.descriptor.digest], 'top down, stopping above the base');
});

t.test('module deleted by a whiteout in a higher layer', async (t) => {
  const { registry, stage } = setup();
  const layers = [
    await baseLayer(),
    await moduleLayer(),
    await buildLayer([{ path: `opt/lib/modules/${K}/extra/.wh.gpu.ko`, content: '' }]),
  ];
  registry.addImage(`${REG}/drivers/gpu:deleted`, { layers });
  await check(t, await stage.run(input('drivers/gpu:deleted')), 'False', 'ModuleNotFound', `module gpu not found in image ${REG}/drivers/gpu:deleted under /opt/lib/modules/${K}/: modules.dep lists extra/gpu.ko, which is not in the image`);
  // A whiteout of a parent directory hides it too.
  const dirGone = [await baseLayer(), await moduleLayer(), await buildLayer([{ path: `opt/lib/modules/.wh.${K}`, content: '' }])];
  registry.addImage(`${REG}/drivers/gpu:dir-deleted`, { layers: dirGone });
  await check(t, await stage.run(input('drivers/gpu:dir-deleted')), 'False', 'ModuleNotFound', `module gpu not found in image ${REG}/drivers/gpu:dir-deleted: there is no directory /opt/lib/modules/${K}/`);
});

t.test('module hidden by an opaque directory', async (t) => {
  const { registry, stage } = setup();
  const layers = [
    await baseLayer(),
    await moduleLayer(),
    await buildLayer([
      { path: `opt/lib/modules/${K}/.wh..wh..opq`, content: '' },
      { path: `opt/lib/modules/${K}/modules.dep`, content: '' },
    ]),
  ];
  registry.addImage(`${REG}/drivers/gpu:opaque`, { layers });
  await check(t, await stage.run(input('drivers/gpu:opaque')), 'False', 'ModuleNotFound', new RegExp(`under /opt/lib/modules/${K}/$`));
  t.notOk(registry.opened.includes(layers[0]!.descriptor.digest), 'below the opaque directory nothing can show: the base is not read');
});

t.test('merged /usr: dirName / with lib -> usr/lib', async (t) => {
  const { registry, stage } = setup();
  const base = await baseLayer([
    { path: 'usr/lib/', type: 'dir' },
    { path: 'lib', type: 'symlink', target: 'usr/lib' },
  ]);
  const mod = await moduleLayer({ root: 'usr' });
  registry.addImage(`${REG}/drivers/gpu:usrmerge`, { layers: [base, mod] });
  const outcome = await stage.run(input('drivers/gpu:usrmerge', { dirName: '/' }));
  await check(t, outcome, 'True', 'Verified', /\(extra\/gpu\.ko, vermagic ok\)/);
  t.same(registry.opened, [mod.descriptor.digest, base.descriptor.digest], 'the symlink is in the base: both are read');

  // A layer tar that spells the path through the lower symlink (no entry for lib/): containerd
  // writes it through the link, to usr/lib/modules.
  const through = await moduleLayer({ root: '' });
  registry.addImage(`${REG}/drivers/gpu:through`, { layers: [base, through] });
  await check(t, await stage.run(input('drivers/gpu:through', { dirName: '/' })), 'True', 'Verified');

  // Split: the module spelled through the link in the top layer, modules.dep in the base's
  // usr/lib: both are in the same directory once applied.
  const baseWithDep = await baseLayer([
    { path: 'usr/lib/', type: 'dir' },
    { path: 'lib', type: 'symlink', target: 'usr/lib' },
    { path: `usr/lib/modules/${K}/modules.dep`, content: 'extra/gpu.ko:\n' },
  ]);
  const onlyModule = await moduleLayer({ root: '', dep: false });
  registry.addImage(`${REG}/drivers/gpu:split`, { layers: [baseWithDep, onlyModule] });
  await check(t, await stage.run(input('drivers/gpu:split', { dirName: '/' })), 'True', 'Verified');
  const noLink = await baseLayer([{ path: `usr/lib/modules/${K}/modules.dep`, content: 'extra/gpu.ko:\n' }]);
  registry.addImage(`${REG}/drivers/gpu:nolink`, { layers: [noLink, onlyModule] });
  // Without the link, /lib is a directory of its own and usr/lib's modules.dep is elsewhere.
  await check(t, await stage.run(input('drivers/gpu:nolink', { dirName: '/' })), 'False', 'ModulesDepMissing', /there is no \/lib\/modules\/.*\/modules\.dep/);

  const missing = await stage.run(input('drivers/gpu:usrmerge', { dirName: '/', moduleName: 'other' }));
  await check(t, missing, 'False', 'ModuleNotFound', `module other not found in image ${REG}/drivers/gpu:usrmerge under /lib/modules/${K}/ (resolved to /usr/lib/modules/${K}/)`);
});

t.test('symlinked path components in general: relative and absolute targets, chains', async (t) => {
  const { registry, stage } = setup();
  const layers = [
    await baseLayer([
      { path: 'opt/lib', type: 'symlink', target: '../srv/vendor/lib' },
      { path: 'srv/vendor/lib', type: 'symlink', target: '/data/lib' },
    ]),
    await moduleLayer({ root: 'data' }),
  ];
  registry.addImage(`${REG}/drivers/gpu:links`, { layers });
  await check(t, await stage.run(input('drivers/gpu:links')), 'True', 'Verified');
  const loop = [await baseLayer([{ path: 'opt/lib', type: 'symlink', target: 'lib' }])];
  registry.addImage(`${REG}/drivers/gpu:loop`, { layers: loop });
  await check(t, await stage.run(input('drivers/gpu:loop')), 'False', 'ModuleNotFound', /too many levels of symbolic links/);
  const escape = [await baseLayer([{ path: 'opt/lib', type: 'symlink', target: '../../../../data/lib' }]), await moduleLayer({ root: 'data' })];
  registry.addImage(`${REG}/drivers/gpu:clamped`, { layers: escape });
  await check(t, await stage.run(input('drivers/gpu:clamped')), 'True', 'Verified', undefined);
});

t.test('module in extra/ and in the kernel tree: modules.dep decides, else depmod order', async (t) => {
  const { registry, stage } = setup();
  const ko = await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC });
  const dir = `opt/lib/modules/${K}`;
  const layer = await buildLayer([
    { path: `${dir}/kernel/drivers/gpu/gpu.ko`, content: ko },
    { path: `${dir}/extra/gpu.ko`, content: ko },
    { path: `${dir}/modules.dep`, content: 'kernel/drivers/gpu/gpu.ko:\n' },
  ]);
  registry.addImage(`${REG}/drivers/gpu:tree`, { layers: [layer] });
  await check(t, await stage.run(input('drivers/gpu:tree')), 'True', 'Verified', /\(kernel\/drivers\/gpu\/gpu\.ko, vermagic ok\)/);
  const extra = await moduleLayer({ sub: 'extra/vendor/gpu' });
  registry.addImage(`${REG}/drivers/gpu:deep`, { layers: [extra] });
  await check(t, await stage.run(input('drivers/gpu:deep')), 'True', 'Verified', /\(extra\/vendor\/gpu\/gpu\.ko, vermagic ok\)/);
});

t.test('.ko.xz module', async (t) => {
  const { registry, stage } = setup();
  registry.addImage(`${REG}/drivers/gpu:xz`, { layers: [await moduleLayer({ moduleCompression: 'xz' })] });
  await check(t, await stage.run(input('drivers/gpu:xz')), 'True', 'Verified', /\(extra\/gpu\.ko\.xz, vermagic ok\)/);
});

t.test('.ko.zst module', async (t) => {
  const { registry, stage } = setup();
  registry.addImage(`${REG}/drivers/gpu:zst`, { layers: [await moduleLayer({ moduleCompression: 'zst' })] });
  await check(t, await stage.run(input('drivers/gpu:zst')), 'True', 'Verified', /\(extra\/gpu\.ko\.zst, vermagic ok\)/);
});

t.test('zstd-compressed layer', async (t) => {
  const { registry, stage } = setup();
  const layer = await moduleLayer({ compression: 'zstd' });
  t.equal(layer.data!.readUInt32LE(0), 0xfd2fb528);
  registry.addImage(`${REG}/drivers/gpu:zstd-layer`, { layers: [await baseLayer(), layer] });
  await check(t, await stage.run(input('drivers/gpu:zstd-layer')), 'True', 'Verified');
});

t.test('vermagic mismatch', async (t) => {
  const { registry, stage } = setup();
  registry.addImage(`${REG}/drivers/gpu:old`, { layers: [await moduleLayer({ vermagic: '6.1.0-17-amd64 SMP preempt mod_unload modversions' })] });
  await check(t, await stage.run(input('drivers/gpu:old')), 'False', 'VermagicMismatch', `module gpu.ko in image ${REG}/drivers/gpu:old was built for 6.1.0-17-amd64, not ${K}`);
  registry.addImage(`${REG}/drivers/gpu:prefix`, { layers: [await moduleLayer({ vermagic: `${K}-rt SMP` })] });
  await check(t, await stage.run(input('drivers/gpu:prefix')), 'False', 'VermagicMismatch', /built for 6\.1\.0-18-amd64-rt, not/);
});

t.test('missing modules.dep', async (t) => {
  const { registry, stage } = setup();
  registry.addImage(`${REG}/drivers/gpu:nodep`, { layers: [await baseLayer(), await moduleLayer({ dep: false })] });
  await check(t, await stage.run(input('drivers/gpu:nodep')), 'False', 'ModulesDepMissing', `depmod was not run for ${K} in image ${REG}/drivers/gpu:nodep: there is no /opt/lib/modules/${K}/modules.dep`);
});

t.test('modules.dep that does not list the module', async (t) => {
  const { registry, stage } = setup();
  registry.addImage(`${REG}/drivers/gpu:stale`, { layers: [await moduleLayer({ dep: 'extra/other.ko:\n' })] });
  await check(t, await stage.run(input('drivers/gpu:stale')), 'False', 'ModuleNotInModulesDep', `modules.dep for ${K} in image ${REG}/drivers/gpu:stale does not list extra/gpu.ko: run depmod after adding the module`);
});

t.test('- and _ are the same in module names', async (t) => {
  const { registry, stage } = setup();
  registry.addImage(`${REG}/drivers/nic:1`, { layers: [await moduleLayer({ name: 'nic-drv' })] });
  await check(t, await stage.run(input('drivers/nic:1', { moduleName: 'nic_drv' })), 'True', 'Verified', /\(extra\/nic-drv\.ko, vermagic ok\)/);
  registry.addImage(`${REG}/drivers/nic:2`, { layers: [await moduleLayer({ name: 'nic_drv' })] });
  await check(t, await stage.run(input('drivers/nic:2', { moduleName: 'nic-drv' })), 'True', 'Verified');
});

t.test('module not found names the directory searched', async (t) => {
  const { registry, stage } = setup();
  registry.addImage(`${REG}/drivers/gpu:1`, { layers: [await baseLayer(), await moduleLayer()] });
  await check(t, await stage.run(input('drivers/gpu:1', { moduleName: 'absent' })), 'False', 'ModuleNotFound', `module absent not found in image ${REG}/drivers/gpu:1 under /opt/lib/modules/${K}/`);
  await check(t, await stage.run(input('drivers/gpu:1', { kernel: '6.1.0-19-amd64' })), 'False', 'ModuleNotFound', `module gpu not found in image ${REG}/drivers/gpu:1: there is no directory /opt/lib/modules/6.1.0-19-amd64/`);
  await check(t, await stage.run(input('drivers/gpu:1', { dirName: '/srv' })), 'False', 'ModuleNotFound', /there is no directory \/srv\/lib\/modules\//);
});

t.test('symlinked and hard-linked module files', async (t) => {
  const { registry, stage } = setup();
  const ko = await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC });
  const dir = `opt/lib/modules/${K}`;
  const lower = await buildLayer([{ path: 'usr/src/gpu/gpu.ko', content: ko }]);
  const upper = await buildLayer([
    { path: `${dir}/extra/gpu.ko`, type: 'symlink', target: '../../../../../usr/src/gpu/gpu.ko' },
    { path: `${dir}/modules.dep`, content: 'extra/gpu.ko:\n' },
  ]);
  registry.addImage(`${REG}/drivers/gpu:symlink`, { layers: [lower, upper] });
  await check(t, await stage.run(input('drivers/gpu:symlink')), 'True', 'Verified');
  const hard = await buildLayer([
    { path: `${dir}/extra/gpu.ko`, type: 'link', target: 'usr/src/gpu/gpu.ko' },
    { path: `${dir}/modules.dep`, content: 'extra/gpu.ko:\n' },
  ]);
  registry.addImage(`${REG}/drivers/gpu:hardlink`, { layers: [lower, hard] });
  await check(t, await stage.run(input('drivers/gpu:hardlink')), 'True', 'Verified');
});

t.test('a module file that is not a kernel module', async (t) => {
  const { registry, stage } = setup();
  const dir = `opt/lib/modules/${K}`;
  registry.addImage(`${REG}/drivers/gpu:junk`, {
    layers: [await buildLayer([{ path: `${dir}/extra/gpu.ko`, content: 'not an elf' }, { path: `${dir}/modules.dep`, content: 'extra/gpu.ko:\n' }])],
  });
  await check(t, await stage.run(input('drivers/gpu:junk')), 'False', 'ModuleUnreadable', /extra\/gpu\.ko .* cannot be read: it is not an ELF file/);
});

t.test('registry errors map to outcomes', async (t) => {
  const image: [RegistryErrorCode, StageOutcome['status'], string, RegExp][] = [
    ['NotFound', 'False', 'ImageNotFound', /^image registry\.test\/drivers\/gpu:e not found$/],
    ['Unauthorized', 'False', 'ImageUnauthorized', /cannot be read with the pull secret/],
    ['NoMatchingPlatform', 'False', 'ImagePlatformNotFound', /has no manifest for linux\/amd64/],
    ['DigestMismatch', 'False', 'ImageDigestMismatch', /./],
    ['Invalid', 'False', 'ImageInvalid', /./],
    ['TooLarge', 'False', 'ImageInvalid', /./],
    ['Unreachable', 'Error', 'RegistryUnreachable', /./],
    ['Timeout', 'Error', 'RegistryTimeout', /./],
    ['RateLimited', 'Error', 'RegistryRateLimited', /./],
    ['ServerError', 'Error', 'RegistryServerError', /./],
  ];
  for (const [code, status, outcomeCode, reason] of image) {
    t.test(`manifest: ${code}`, async (t) => {
      const { registry, stage } = setup();
      registry.addImage(`${REG}/drivers/gpu:e`, { layers: [], error: code });
      await check(t, await stage.run(input('drivers/gpu:e')), status, outcomeCode, reason);
    });
  }
  const layer: [RegistryErrorCode, StageOutcome['status'], string][] = [
    ['NotFound', 'False', 'LayerNotFound'],
    ['Unauthorized', 'False', 'ImageUnauthorized'],
    ['Unreachable', 'Error', 'RegistryUnreachable'],
    ['Timeout', 'Error', 'RegistryTimeout'],
    ['RateLimited', 'Error', 'RegistryRateLimited'],
    ['ServerError', 'Error', 'RegistryServerError'],
    ['TooLarge', 'False', 'LayerTooLarge'],
  ];
  for (const [code, status, outcomeCode] of layer) {
    t.test(`layer blob: ${code}`, async (t) => {
      const { registry, stage, cache } = setup();
      const top = await moduleLayer();
      registry.addImage(`${REG}/drivers/gpu:b`, { layers: [top] });
      registry.behaviours.set(top.descriptor.digest, { openError: code });
      await check(t, await stage.run(input('drivers/gpu:b')), status, outcomeCode, new RegExp(`layer ${top.descriptor.digest}`));
      t.equal(await cache.get(top.descriptor.digest), undefined, 'nothing cached');
    });
  }
  t.test('an invalid reference', async (t) => {
    const { stage } = setup();
    await check(t, await stage.run({ ...input('x'), image: 'Not A Reference' }), 'False', 'ImageReferenceInvalid', /invalid image reference/);
  });
});

t.test('a layer whose digest does not match gives no verdict and is not cached', async (t) => {
  const { registry, stage, cache } = setup();
  // The bytes served are a valid layer with the module: only the digest check can catch it.
  // Uncompressed, so that both have exactly the same size.
  const other = await moduleLayer({ compression: 'none', extra: [{ path: 'tampered', content: 'yes' }] });
  const claimed = await moduleLayer({ compression: 'none', extra: [{ path: 'original', content: 'yes' }] });
  t.equal(other.data!.length, claimed.data!.length);
  registry.addImage(`${REG}/drivers/gpu:tampered`, { layers: [claimed] });
  registry.behaviours.set(claimed.descriptor.digest, { corruptWith: other.data! });
  await check(t, await stage.run(input('drivers/gpu:tampered')), 'False', 'LayerDigestMismatch', `layer ${claimed.descriptor.digest} of image ${REG}/drivers/gpu:tampered does not match its digest`);
  t.equal(await cache.get(claimed.descriptor.digest), undefined);
  registry.behaviours.delete(claimed.descriptor.digest);
  await check(t, await stage.run(input('drivers/gpu:tampered')), 'True', 'Verified', undefined);
});

t.test('a tar with ../ paths is refused', async (t) => {
  const { registry, stage } = setup();
  const evil = await buildLayer([
    { path: `opt/lib/modules/${K}/extra/gpu.ko`, content: await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC }) },
    { path: '../../etc/cron.d/x', content: '* * * * * root sh\n' },
  ]);
  registry.addImage(`${REG}/drivers/gpu:evil`, { layers: [await baseLayer(), evil] });
  await check(t, await stage.run(input('drivers/gpu:evil')), 'False', 'LayerInvalid', `image ${REG}/drivers/gpu:evil: layer ${evil.descriptor.digest} has a path that leaves the root: ../../etc/cron.d/x`);
});

t.test('a gzip bomb is refused with bounded memory', async (t) => {
  const { registry, stage } = setup({ maxUncompressedBytes: 256 * 1024 * 1024 });
  const bomb = gzipBombBlob({ uncompressedBytes: 2 * 1024 ** 3 });
  registry.addImage(`${REG}/drivers/gpu:bomb`, { layers: [await baseLayer(), bomb] });
  globalThis.gc?.();
  const before = process.memoryUsage().rss;
  let peak = before;
  const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 2);
  const started = performance.now();
  const outcome = await stage.run(input('drivers/gpu:bomb'));
  clearInterval(timer);
  peak = Math.max(peak, process.memoryUsage().rss);
  await check(t, outcome, 'False', 'LayerTooLarge', /decompresses to more than 256 MiB: refused as a decompression bomb/);
  const growth = (peak - before) / 1024 / 1024;
  t.comment(`2 GiB gzip bomb (${bomb.descriptor.size} bytes compressed): refused in ${(performance.now() - started).toFixed(0)} ms, rss growth ${growth.toFixed(1)} MiB`);
  t.ok(growth < 100, `rss growth ${growth.toFixed(1)} MiB stays under 100 MiB`);
  registry.resetCounters();
  await check(t, await stage.run(input('drivers/gpu:bomb')), 'False', 'LayerTooLarge');
  t.equal(registry.bytesReceived, 0, 'the refusal is cached');
});

t.test('a second validation reads no layer bytes, in under 50 ms', async (t) => {
  const { registry, stage } = setup();
  // Module in the middle: the top layer holds nothing relevant, the base is never needed.
  const layers = [await baseLayer(), await moduleLayer(), await buildLayer([{ path: 'etc/motd', content: 'hi' }])];
  registry.addImage(`${REG}/drivers/gpu:1`, { layers });
  const first = await stage.run(input('drivers/gpu:1'));
  await check(t, first, 'True', 'Verified');
  t.ok(registry.bytesReceived > 0);
  registry.resetCounters();
  const times: number[] = [];
  for (let i = 0; i < 5; i++) {
    const started = performance.now();
    const again = await stage.run(input('drivers/gpu:1'));
    times.push(performance.now() - started);
    t.same(again, first);
  }
  t.equal(registry.bytesReceived, 0, 'no layer bytes');
  t.same(registry.opened, [], 'no blob opened');
  const best = Math.min(...times);
  t.comment(`cached second validation: ${times.map((x) => x.toFixed(2)).join(', ')} ms`);
  t.ok(times[0]! < 50, `first cached run ${times[0]!.toFixed(2)} ms < 50 ms`);
  t.ok(best < 50);
  // A not-found answer needs every layer; cached, it reads nothing either.
  await stage.run(input('drivers/gpu:1', { moduleName: 'absent' }));
  registry.resetCounters();
  await check(t, await stage.run(input('drivers/gpu:1', { moduleName: 'absent' })), 'False', 'ModuleNotFound');
  t.equal(registry.bytesReceived, 0, '"nothing relevant" is cached too');
});

t.test('images sharing layers share scans; the disk cache serves a new process', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'image-stage-cache-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const { registry, stage } = setup({}, createDiskLayerCache({ dir }));
  const base = await baseLayer();
  const mod = await moduleLayer();
  registry.addImage(`${REG}/drivers/gpu:a`, { layers: [base, mod] });
  registry.addImage(`${REG}/drivers/gpu:b`, { layers: [base, mod] });
  registry.addImage(`${REG}/drivers/gpu:c`, { layers: [base, mod, await buildLayer([{ path: 'etc/c', content: 'c' }])] });
  await check(t, await stage.run(input('drivers/gpu:a')), 'True', 'Verified');
  registry.resetCounters();
  await check(t, await stage.run(input('drivers/gpu:b')), 'True', 'Verified');
  t.equal(registry.bytesReceived, 0, 'same layers, another tag: nothing read');
  await check(t, await stage.run(input('drivers/gpu:c')), 'True', 'Verified');
  t.equal(registry.opened.length, 1, 'only the new top layer is read');
  const fresh = createImageStage({ registry, cache: createDiskLayerCache({ dir }) });
  registry.resetCounters();
  await check(t, await fresh.run(input('drivers/gpu:a')), 'True', 'Verified');
  t.equal(registry.bytesReceived, 0, 'a new stage (process) on the same directory reads nothing');
});

t.test('an in-flight lower download is aborted once the top layer decides', async (t) => {
  const { registry, stage } = setup({ layerConcurrency: 3 });
  const slow = await buildLayer([{ path: 'usr/share/big', content: Buffer.alloc(4 * 1024 * 1024, 1) }], 'none');
  const top = await moduleLayer();
  registry.addImage(`${REG}/drivers/gpu:prefetch`, { layers: [slow, top] });
  registry.behaviours.set(slow.descriptor.digest, { chunkDelayMs: 10, chunkSize: 16 * 1024 });
  await check(t, await stage.run(input('drivers/gpu:prefetch')), 'True', 'Verified');
  await new Promise((r) => setTimeout(r, 50));
  t.ok(registry.opened.includes(slow.descriptor.digest), 'the lower layer was being prefetched');
  t.same(registry.destroyed, [slow.descriptor.digest], 'and its download was destroyed');
  t.notOk(registry.completed.includes(slow.descriptor.digest));
  t.ok(registry.bytesReceived < slow.data!.length / 2, `${registry.bytesReceived} bytes read`);
  t.equal(stage.stats.layersAborted, 1);
});

t.test('input.signal aborts the validation and its downloads', async (t) => {
  const { registry, stage } = setup();
  const slow = await buildLayer([{ path: 'usr/share/big', content: Buffer.alloc(2 * 1024 * 1024, 1) }], 'none');
  registry.addImage(`${REG}/drivers/gpu:slow`, { layers: [slow] });
  registry.behaviours.set(slow.descriptor.digest, { chunkDelayMs: 10, chunkSize: 16 * 1024 });
  const controller = new AbortController();
  setTimeout(() => controller.abort(new Error('validation cancelled')), 60);
  await t.rejects(stage.run(input('drivers/gpu:slow', { signal: controller.signal })), { message: 'validation cancelled' });
  await new Promise((r) => setTimeout(r, 50));
  t.same(registry.destroyed, [slow.descriptor.digest]);
});

t.test('concurrent validations of one image share one download per layer', async (t) => {
  const { registry, stage } = setup();
  const top = await moduleLayer({ extra: [{ path: 'opt/pad', content: Buffer.alloc(512 * 1024, 2) }] });
  registry.addImage(`${REG}/drivers/gpu:shared`, { layers: [await baseLayer(), top] });
  registry.behaviours.set(top.descriptor.digest, { chunkDelayMs: 2, chunkSize: 16 * 1024 });
  const outcomes = await Promise.all([1, 2, 3].map(() => stage.run(input('drivers/gpu:shared'))));
  for (const o of outcomes) t.equal(o.code, 'Verified');
  t.same(registry.opened, [top.descriptor.digest], 'one download');
  t.equal(stage.stats.sharedScans, 2);
});

// ---------------------------------------------------------------------------------------------
// Against a real registry (Debian's docker-registry) and the real client

const realHelpers = await import('../helpers/registry.ts');

t.test('against a real registry with the real client', async (t) => {
  const { startRegistry, accessFor } = realHelpers;
  const { pushImage, gzipBomb } = await import('../helpers/images.ts');
  const { createRegistryClient } = await import('../../src/registry/client.ts');
  const registry = await startRegistry();
  t.teardown(() => registry.stop());
  const client = createRegistryClient();
  t.teardown(() => client.close());
  const access = accessFor(registry);
  const stage = createImageStage({ registry: client, cache: createMemoryLayerCache(), limits: { maxUncompressedBytes: 256 * 1024 * 1024 } });
  const ko = await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC });
  const xz = await buildModuleXz({ name: 'nic-x', vermagic: VERMAGIC });
  const dir = `opt/lib/modules/${K}`;
  const pushed = await pushImage(registry, 'kmm/gpu:v1', {
    layers: [
      { entries: [{ path: 'etc/os-release', content: 'ID=debian\n' }, { path: 'lib', linkTo: 'usr/lib' }] },
      {
        compression: 'zstd',
        entries: [
          { path: `${dir}/extra/gpu.ko`, content: ko },
          { path: `${dir}/extra/nic-x.ko.xz`, content: xz },
          { path: `${dir}/modules.dep`, content: 'extra/gpu.ko:\nextra/nic-x.ko.xz:\n' },
        ],
      },
      { entries: [{ whiteout: `${dir}/extra/nic-x.ko.xz` }] },
    ],
  });
  const run = (over: Partial<ImageStageInput> = {}) =>
    stage.run({ image: pushed.reference, moduleName: 'gpu', dirName: '/opt', kernel: K, access, platform, ...over });

  await check(t, await run(), 'True', 'Verified', `module gpu found in image ${pushed.reference} for kernel ${K} (extra/gpu.ko, vermagic ok)`);
  const afterFirst = client.bytesReceived;
  const started = performance.now();
  await check(t, await run(), 'True', 'Verified');
  const elapsed = performance.now() - started;
  t.comment(`real registry, cached second validation: ${elapsed.toFixed(1)} ms (manifest fetched again, no layer bytes)`);
  const layerBytes = pushed.layerData.reduce((n, d) => n + d.length, 0);
  t.ok(client.bytesReceived - afterFirst < layerBytes, 'only the manifest is read again');
  await check(t, await run({ moduleName: 'nic_x' }), 'False', 'ModuleNotFound', /modules\.dep lists extra\/nic-x\.ko\.xz, which is not in the image/);
  await check(t, await run({ kernel: '6.1.0-17-amd64' }), 'False', 'ModuleNotFound');
  await check(t, await run({ image: `${registry.host}/kmm/absent:v1` }), 'False', 'ImageNotFound', `image ${registry.host}/kmm/absent:v1 not found`);

  const bomb = await gzipBomb({ uncompressedBytes: 1024 ** 3 });
  const bombImage = await pushImage(registry, 'kmm/bomb:v1', { layers: [{ data: bomb.data, compression: 'gzip', diffId: bomb.diffId }] });
  await check(t, await run({ image: bombImage.reference }), 'False', 'LayerTooLarge', /decompression bomb/);

  const secured = await startRegistry({ auth: 'htpasswd' });
  t.teardown(() => secured.stop());
  const securedImage = await pushImage(secured, 'kmm/gpu:v1', { layers: [{ entries: [{ path: `${dir}/extra/gpu.ko`, content: ko }] }] });
  const noSecret = { insecure: true };
  await check(
    t,
    await stage.run({ image: securedImage.reference, moduleName: 'gpu', dirName: '/opt', kernel: K, access: noSecret, platform }),
    'False',
    'ImageUnauthorized',
    /cannot be read with the pull secret/,
  );
  await check(
    t,
    await stage.run({ image: securedImage.reference, moduleName: 'gpu', dirName: '/opt', kernel: K, access: accessFor(secured), platform }),
    'False',
    'ModulesDepMissing',
  );

  const downClient = createRegistryClient({ retries: 0, timeoutMs: 2000 });
  t.teardown(() => downClient.close());
  const down = createImageStage({ registry: downClient, cache: createMemoryLayerCache() });
  await registry.stop();
  await check(
    t,
    await down.run({ image: `${registry.host}/kmm/gpu:v2`, moduleName: 'gpu', dirName: '/opt', kernel: K, access, platform }),
    'Error',
    'RegistryUnreachable',
  );
});

t.test('a multi-arch index: the module is looked for in the target platform\'s image only', async (t) => {
  const { startRegistry, accessFor } = realHelpers;
  const { pushImage, pushIndex } = await import('../helpers/images.ts');
  const { createRegistryClient } = await import('../../src/registry/client.ts');
  const registry = await startRegistry();
  t.teardown(() => registry.stop());
  const client = createRegistryClient();
  t.teardown(() => client.close());
  const access = accessFor(registry);
  const ko = await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC });
  const dir = `opt/lib/modules/${K}`;
  const amd64 = await pushImage(registry, 'kmm/multi:amd64', {
    platform: { os: 'linux', architecture: 'amd64' },
    layers: [{ entries: [{ path: `${dir}/extra/gpu.ko`, content: ko }, { path: `${dir}/modules.dep`, content: 'extra/gpu.ko:\n' }] }],
  });
  const arm64 = await pushImage(registry, 'kmm/multi:arm64', {
    platform: { os: 'linux', architecture: 'arm64' },
    layers: [{ entries: [{ path: 'etc/os-release', content: 'ID=debian\n' }] }],
  });
  const index = await pushIndex(registry, 'kmm/multi:v1', [
    { platform: { os: 'linux', architecture: 'amd64' }, ref: amd64 },
    { platform: { os: 'linux', architecture: 'arm64' }, ref: arm64 },
  ]);
  const stage = createImageStage({ registry: client, cache: createMemoryLayerCache() });
  const run = (architecture: string) =>
    stage.run({ image: index.reference, moduleName: 'gpu', dirName: '/opt', kernel: K, access, platform: { os: 'linux', architecture } });
  t.match(await run('amd64'), { status: 'True', code: 'Verified' });
  t.match(await run('arm64'), { status: 'False', code: 'ModuleNotFound' });
  t.match(await run('s390x'), { status: 'False', reason: /s390x/ });
});
