import t from 'tap';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { createDiskLayerCache, createMemoryLayerCache, createTieredLayerCache } from '../../src/engine/layer-cache.ts';
import {
  detectCompression,
  isScanReusable,
  normalizeEntryPath,
  scanLayer,
  type LayerFileEntry,
  type LayerScanResult,
} from '../../src/engine/layer-scan.ts';
import { RegistryError } from '../../src/registry/types.ts';
import { buildLayer, buildModuleObject, buildModuleXz, buildModuleZst, buildTar, compressLayer, sha256, type FileSpec } from '../helpers/kmod-fixtures.ts';

const K = '6.1.0-18-amd64';
const VERMAGIC = `${K} SMP preempt mod_unload modversions`;

async function scan(files: readonly FileSpec[], compression: 'gzip' | 'zstd' | 'none' = 'gzip', limits = {}): Promise<LayerScanResult> {
  const layer = await buildLayer(files, compression);
  return scanLayer(Readable.from([layer.data!]), { digest: layer.descriptor.digest, limits });
}

function file(result: LayerScanResult, path: string): LayerFileEntry {
  const e = result.entries[path];
  if (e?.type !== 'file') throw new Error(`${path} is not a recorded file: ${JSON.stringify(e)}`);
  return e;
}

t.test('compression is detected by magic bytes, whatever the media type says', async (t) => {
  t.equal(detectCompression(Buffer.from([0x1f, 0x8b, 8, 0])), 'gzip');
  t.equal(detectCompression(Buffer.from([0x28, 0xb5, 0x2f, 0xfd])), 'zstd');
  t.equal(detectCompression(Buffer.from('ustar')), 'none');
  const ko = await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC });
  const files = [{ path: `opt/lib/modules/${K}/extra/gpu.ko`, content: ko }];
  for (const c of ['gzip', 'zstd', 'none'] as const) {
    const r = await scan(files, c);
    t.equal(r.compression, c);
    t.equal(file(r, `opt/lib/modules/${K}/extra/gpu.ko`).module?.vermagic, VERMAGIC, `module read from a ${c} layer`);
  }
  // A gzip layer served under a zstd media type still reads: only the bytes count.
  const gz = await buildLayer(files, 'gzip');
  const r = await scanLayer(Readable.from([gz.data!]), { digest: gz.descriptor.digest });
  t.equal(r.compression, 'gzip');
});

t.test('paths are normalised: ./ prefixes, duplicate slashes, leading slash', async (t) => {
  t.equal(normalizeEntryPath('./opt//lib/./modules/'), 'opt/lib/modules');
  t.equal(normalizeEntryPath('/etc/passwd'), 'etc/passwd');
  t.equal(normalizeEntryPath('a/../b'), undefined);
  const ko = await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC });
  const r = await scan([
    { path: './opt/', type: 'dir' },
    { path: `./opt//lib/modules/${K}/extra/gpu.ko`, content: ko },
    { path: `/opt/lib/modules/${K}/modules.dep`, content: 'extra/gpu.ko:\n' },
  ]);
  t.ok(r.entries['opt']);
  t.ok(file(r, `opt/lib/modules/${K}/extra/gpu.ko`).module);
  t.same(file(r, `opt/lib/modules/${K}/modules.dep`).modulesDep?.modules, { 'extra/gpu.ko': [] });
});

t.test('a path that leaves the root refuses the layer', async (t) => {
  const r = await scan([
    { path: 'ok', content: 'fine' },
    { path: '../x', content: 'escape' },
  ]);
  t.equal(r.refused?.code, 'PathEscape');
  t.match(r.refused?.reason, /^layer sha256:[0-9a-f]{64} has a path that leaves the root: \.\.\/x$/);
  t.same(r.entries, {}, 'nothing from a refused layer is used');
  const deep = await scan([{ path: 'opt/lib/../../../etc/shadow', content: 'x' }]);
  t.equal(deep.refused?.code, 'PathEscape');
  const link = await scan([
    { path: 'a', content: 'x' },
    { path: `opt/lib/modules/${K}/extra/gpu.ko`, type: 'link', target: '../../etc/shadow' },
  ]);
  t.equal(link.refused?.code, 'PathEscape', 'a hard link out of the root too');
  t.match(link.refused?.reason, /hard link that leaves the root/);
});

t.test('whiteouts and opaque directories are recorded', async (t) => {
  const r = await scan([
    { path: `opt/lib/modules/${K}/extra/.wh.gpu.ko`, content: '' },
    { path: `opt/lib/modules/${K}/updates/.wh..wh..opq`, content: '' },
    { path: '.wh.lib', content: '' },
    { path: 'usr/.wh..wh.plnk', content: '' },
  ]);
  t.same([...r.whiteouts].sort(), ['lib', `opt/lib/modules/${K}/extra/gpu.ko`]);
  t.same(r.opaqueDirs, [`opt/lib/modules/${K}/updates`]);
  t.notOk(Object.keys(r.entries).some((p) => p.includes('.wh.')), 'whiteout files are not entries');
});

t.test('symlinks anywhere and hard links are recorded; a hard link to a module carries its modinfo', async (t) => {
  const ko = await buildModuleObject({ name: 'gpu', vermagic: VERMAGIC });
  const r = await scan([
    { path: 'lib', type: 'symlink', target: 'usr/lib' },
    { path: 'usr/share/doc/x/changelog', type: 'symlink', target: '../y/changelog' },
    { path: 'usr/src/gpu/gpu.ko', content: ko },
    { path: `usr/lib/modules/${K}/extra/gpu.ko`, type: 'link', target: 'usr/src/gpu/gpu.ko' },
    { path: `usr/lib/modules/${K}/extra/lower.ko`, type: 'link', target: 'opt/elsewhere/lower.ko' },
  ]);
  t.same(r.entries['lib'], { type: 'symlink', target: 'usr/lib' });
  t.same(r.entries['usr/share/doc/x/changelog'], { type: 'symlink', target: '../y/changelog' });
  const linked = file(r, `usr/lib/modules/${K}/extra/gpu.ko`);
  t.equal(linked.linkOf, 'usr/src/gpu/gpu.ko');
  t.equal(linked.module?.vermagic, VERMAGIC);
  t.same(r.entries[`usr/lib/modules/${K}/extra/lower.ko`], { type: 'hardlink', target: 'opt/elsewhere/lower.ko' }, 'resolved later, across layers');
});

t.test('only what can matter is recorded: other files are drained', async (t) => {
  const r = await scan([
    { path: 'usr/bin/tool', content: Buffer.alloc(3 * 1024 * 1024, 1) },
    { path: 'usr/share/doc/pkg/README', content: 'hello' },
    { path: 'usr/share/doc/pkg', type: 'dir' },
    { path: 'usr/share/doc', type: 'dir' },
    { path: 'etc/os-release', content: 'ID=debian\n' },
    { path: `usr/lib/modules/${K}/modules.alias`, content: 'alias x y\n' },
  ]);
  t.equal(r.entryCount, 6);
  t.same(Object.keys(r.entries).sort(), ['etc/os-release', 'usr/lib/modules/6.1.0-18-amd64/modules.alias', 'usr/share/doc']);
  t.equal(r.uncompressedBytes > 3 * 1024 * 1024, true);
});

t.test('module files of every compression get their modinfo; modules.dep is parsed', async (t) => {
  const spec = { name: 'nic-x', vermagic: VERMAGIC, depends: ['mdio'] };
  const dir = `opt/lib/modules/${K}`;
  const r = await scan([
    { path: `${dir}/extra/a.ko`, content: await buildModuleObject(spec) },
    { path: `${dir}/extra/b.ko.xz`, content: await buildModuleXz(spec) },
    { path: `${dir}/extra/c.ko.zst`, content: await buildModuleZst(spec) },
    { path: `${dir}/extra/broken.ko`, content: 'not an elf' },
    { path: `${dir}/modules.dep`, content: 'extra/a.ko: kernel/mdio.ko\nextra/b.ko.xz:\n' },
    { path: `${dir}/modules.dep.bin`, content: Buffer.alloc(100) },
  ]);
  for (const n of ['a.ko', 'b.ko.xz', 'c.ko.zst']) {
    const info = file(r, `${dir}/extra/${n}`).module;
    t.equal(info?.vermagic, VERMAGIC, n);
    t.same(info?.depends, ['mdio'], n);
  }
  t.match(file(r, `${dir}/extra/broken.ko`).error, /not an ELF file/);
  t.same(file(r, `${dir}/modules.dep`).modulesDep?.modules, { 'extra/a.ko': ['kernel/mdio.ko'], 'extra/b.ko.xz': [] });
  t.notOk(file(r, `${dir}/modules.dep.bin`).modulesDep, 'modules.dep.bin is not read');
});

t.test('a module file over the candidate cap is recorded as unreadable, not buffered', async (t) => {
  const r = await scan([{ path: `opt/lib/modules/${K}/extra/huge.ko`, content: Buffer.alloc(2 * 1024 * 1024) }], 'gzip', {
    maxCandidateBytes: 1024 * 1024,
  });
  const e = file(r, `opt/lib/modules/${K}/extra/huge.ko`);
  t.match(e.error, /larger than 1 MiB/);
  t.equal(e.errorLimit, 1024 * 1024);
  t.notOk(r.refused, 'the rest of the layer is still usable');
  t.ok(isScanReusable(r, { maxCandidateBytes: 1024 * 1024 }));
  t.notOk(isScanReusable(r, { maxCandidateBytes: 4 * 1024 * 1024 }), 'rescanned when the cap is raised');
});

t.test('a layer decompressing past the cap is refused as a decompression bomb', async (t) => {
  const r = await scan([{ path: 'zeros', content: Buffer.alloc(4 * 1024 * 1024) }], 'gzip', { maxUncompressedBytes: 1024 * 1024 });
  t.equal(r.refused?.code, 'DecompressionLimit');
  t.match(r.refused?.reason, /decompresses to more than 1 MiB: refused as a decompression bomb/);
  t.ok(r.compressedBytes > 0, 'the compressed stream is still read to its end (digest check)');
  t.ok(isScanReusable(r, { maxUncompressedBytes: 1024 * 1024 }));
  t.notOk(isScanReusable(r, {}), 'not reused under a larger cap');
});

t.test('too many entries is refused', async (t) => {
  const files = Array.from({ length: 20 }, (_, i) => ({ path: `f${i}`, content: 'x' }));
  const r = await scan(files, 'none', { maxEntries: 10 });
  t.equal(r.refused?.code, 'TooManyEntries');
});

t.test('not a tar, or a broken compressed stream: refused as invalid', async (t) => {
  const text = Buffer.from('this is not a tar archive at all. '.repeat(40));
  const r = await scanLayer(Readable.from([text]), { digest: sha256(text) });
  t.equal(r.refused?.code, 'InvalidArchive');
  const tar = await buildTar([{ path: 'a', content: Buffer.alloc(100_000, 3) }]);
  const gz = compressLayer(tar, 'gzip');
  const truncated = gz.subarray(0, gz.length - 100);
  const r2 = await scanLayer(Readable.from([truncated]), { digest: sha256(truncated) });
  t.equal(r2.refused?.code, 'InvalidArchive');
  t.match(r2.refused?.reason, /not a valid gzip-compressed tar archive/);
  const empty = await scanLayer(Readable.from([]), { digest: sha256(Buffer.alloc(0)) });
  t.notOk(empty.refused, 'an empty blob holds nothing');
  t.equal(empty.entryCount, 0);
});

t.test('a blob stream error (digest mismatch) rejects: no result from that layer', async (t) => {
  const layer = await buildLayer([{ path: 'a', content: 'x' }]);
  const stream = Readable.from(
    (async function* () {
      yield layer.data!;
      throw new RegistryError('DigestMismatch', 'registry.test', 'blob has another digest');
    })(),
  );
  await t.rejects(scanLayer(stream, { digest: layer.descriptor.digest }), { code: 'DigestMismatch' });
});

t.test('abort: the scan rejects with the reason and the blob stream is destroyed', async (t) => {
  const controller = new AbortController();
  const stream = Readable.from(
    (async function* () {
      for (;;) {
        yield Buffer.alloc(512);
        await new Promise((r) => setTimeout(r, 5));
      }
    })(),
  );
  setTimeout(() => controller.abort(new Error('stop')), 30);
  await t.rejects(scanLayer(stream, { digest: 'sha256:x', signal: controller.signal }), { message: 'stop' });
  t.ok(stream.destroyed);
});

t.test('a scan is JSON: it round-trips and serves any module name or kernel', async (t) => {
  const r = await scan([
    { path: `opt/lib/modules/${K}/extra/a.ko`, content: await buildModuleObject({ name: 'a', vermagic: VERMAGIC }) },
    { path: `opt/lib/modules/6.1.0-17-amd64/extra/b.ko`, content: await buildModuleObject({ name: 'b', vermagic: '6.1.0-17-amd64 SMP' }) },
    { path: '__proto__', type: 'symlink', target: 'x' },
  ]);
  const copy = JSON.parse(JSON.stringify(r)) as LayerScanResult;
  t.same(copy, r);
  t.ok(Object.hasOwn(copy.entries, '__proto__'), 'odd names survive as own keys');
  t.ok(copy.entries[`opt/lib/modules/6.1.0-17-amd64/extra/b.ko`], 'other kernels are recorded too');
});

// ---------------------------------------------------------------------------------------------
// Layer caches (src/engine/layer-cache.ts)

function fakeScan(digest: string, payload = 0): LayerScanResult {
  return {
    version: 1,
    digest,
    compression: 'gzip',
    compressedBytes: 1,
    uncompressedBytes: 1,
    entryCount: payload,
    limits: { maxUncompressedBytes: 1, maxCandidateBytes: 1, maxEntries: 1, maxRecordedEntries: 1, zstdWindowLogMax: 27 },
    entries: Object.fromEntries(Array.from({ length: payload }, (_, i) => [`p/${i}`, { type: 'dir' as const }])),
    whiteouts: [],
    opaqueDirs: [],
  };
}
const d = (n: number): string => `sha256:${n.toString(16).padStart(64, '0')}`;

t.test('memory cache: LRU by entries and by bytes', async (t) => {
  const c = createMemoryLayerCache({ maxEntries: 2 });
  await c.set(d(1), fakeScan(d(1)));
  await c.set(d(2), fakeScan(d(2)));
  t.ok(await c.get(d(1)), 'touch 1: 2 is now the least recent');
  await c.set(d(3), fakeScan(d(3)));
  t.ok(await c.get(d(1)));
  t.notOk(await c.get(d(2)), 'evicted');
  t.ok(await c.get(d(3)));
  const small = createMemoryLayerCache({ maxBytes: 3000 });
  await small.set(d(1), fakeScan(d(1), 50));
  await small.set(d(2), fakeScan(d(2), 50));
  await small.set(d(3), fakeScan(d(3), 50));
  t.ok(small.bytes <= 3000, `bytes ${small.bytes}`);
  t.notOk(await small.get(d(1)));
  await small.set(d(4), fakeScan(d(4), 1000));
  t.notOk(await small.get(d(4)), 'an entry larger than the cache is not kept');
});

t.test('disk cache: JSON files, atomic writes, corrupt or foreign files are misses', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'layer-cache-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const c = createDiskLayerCache({ dir: join(dir, 'sub'), memory: false });
  t.equal(await c.get(d(1)), undefined);
  await c.set(d(1), fakeScan(d(1), 3));
  t.same(await c.get(d(1)), fakeScan(d(1), 3));
  const again = createDiskLayerCache({ dir: join(dir, 'sub') });
  t.same(await again.get(d(1)), fakeScan(d(1), 3), 'another instance (process) reads it');
  t.equal(await again.get(d(1)), await again.get(d(1)), 'then from its memory front: the same object');
  t.same((await readdir(join(dir, 'sub'))).filter((f) => f.endsWith('.tmp')), [], 'no temporary files left');
  await Promise.all(Array.from({ length: 20 }, (_, i) => c.set(d(2), fakeScan(d(2), i))));
  t.equal((await c.get(d(2)))?.digest, d(2), 'concurrent writers: one whole entry wins');
  await writeFile(c.pathOf(d(3)), '{"version":1,"dig');
  t.equal(await c.get(d(3)), undefined, 'torn file is a miss');
  await writeFile(c.pathOf(d(4)), JSON.stringify(fakeScan(d(5))));
  t.equal(await c.get(d(4)), undefined, 'a file for another digest is a miss');
  t.equal(await c.get('../../etc/passwd'), undefined, 'not a digest: never a path');
  t.throws(() => c.pathOf('sha256:../../x'));
});

t.test('tiered cache: memory in front of disk', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'layer-cache-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const disk = createDiskLayerCache({ dir, memory: false });
  await disk.set(d(7), fakeScan(d(7)));
  const memory = createMemoryLayerCache();
  const c = createTieredLayerCache(memory, disk);
  t.ok(await c.get(d(7)));
  t.equal(memory.size, 1, 'a disk hit is copied to memory');
  await c.set(d(8), fakeScan(d(8)));
  t.ok(await disk.get(d(8)));
});
