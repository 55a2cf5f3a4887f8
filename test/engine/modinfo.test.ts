import t, { type Test } from 'tap';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import {
  decompressModule,
  findInModulesDep,
  isModuleFileName,
  ModinfoError,
  moduleNameFromPath,
  parseModinfo,
  parseModulesDep,
  readModuleInfo,
  xzDecompressedSize,
} from '../../src/engine/modinfo.ts';
import { ensureDebianBinary } from '../helpers/debian.ts';
import {
  appendLegacySignature,
  buildElf,
  buildModuleObject,
  compressModule,
  kmodModinfo,
  writeTemp,
} from '../helpers/kmod-fixtures.ts';

const run = promisify(execFile);
const VERMAGIC = '6.1.0-18-amd64 SMP preempt mod_unload modversions';
const spec = { name: 'gpu', vermagic: VERMAGIC, depends: ['drm', 'i2c_core'], extra: { srcversion: 'ABCDEF0123456789ABCDEF0', license: 'GPL' } };

/** Our parser and Debian's `modinfo` agree on vermagic, name and depends of `data` saved as `name`. */
async function agreesWithKmod(t: Test, name: string, data: Buffer): Promise<void> {
  const ours = await readModuleInfo(data, name, 64 * 1024 * 1024);
  const file = await writeTemp(name, data);
  try {
    t.equal(ours.vermagic, await kmodModinfo('vermagic', file.path), 'vermagic as modinfo reads it');
    t.equal(ours.name, await kmodModinfo('name', file.path), 'name as modinfo reads it');
    t.equal(ours.depends.join(','), await kmodModinfo('depends', file.path), 'depends as modinfo reads it');
  } finally {
    await file.cleanup();
  }
}

t.before(async () => {
  await ensureDebianBinary('modinfo', 'kmod');
});

t.test('a gcc-built 64-bit object: the same fields as kmod modinfo', async (t) => {
  const ko = await buildModuleObject(spec);
  const info = parseModinfo(ko);
  t.equal(info.vermagic, VERMAGIC);
  t.equal(info.name, 'gpu');
  t.same(info.depends, ['drm', 'i2c_core']);
  t.equal(info.srcversion, 'ABCDEF0123456789ABCDEF0');
  t.equal(info.license, 'GPL');
  t.same(info.elf, { class: 64, endian: 'le', machine: 62 });
  await agreesWithKmod(t, 'gpu.ko', ko);
});

// gcc without multilib cannot target 32-bit: then only the hand-written ELF32 tests below run.
const m32 = await buildModuleObject({ ...spec, bits: 32 }).then(
  (b) => b,
  () => undefined,
);
t.test('a gcc-built 32-bit object (gcc -m32)', { skip: m32 ? false : 'gcc -m32 (multilib) is not available here' }, async (t) => {
  const ko = m32!;
  t.same(parseModinfo(ko).elf, { class: 32, endian: 'le', machine: 3 });
  await agreesWithKmod(t, 'gpu.ko', ko);
});

for (const bits of [32, 64] as const) {
  t.test(`a big-endian ELF${bits} object`, async (t) => {
    const elf = buildElf({ bits, endian: 'be', modinfo: [`vermagic=${VERMAGIC}`, 'name=nic_be', 'depends=mdio'] });
    const info = parseModinfo(elf);
    t.same(info.elf.endian, 'be');
    t.equal(info.elf.class, bits);
    t.equal(info.name, 'nic_be');
    await agreesWithKmod(t, 'nic_be.ko', elf);
  });
}

t.test('.ko.xz (xz --check=crc32 --lzma2=dict=1MiB, as kbuild)', async (t) => {
  const ko = await buildModuleObject(spec);
  const xz = await compressModule(ko, 'xz');
  t.equal(xzDecompressedSize(xz), ko.length, 'the size from the LZMA2 chunk headers is exact');
  t.same(await decompressModule(xz, 'xz', 1 << 20), ko);
  await agreesWithKmod(t, 'gpu.ko.xz', xz);
});

t.test('.ko.zst', async (t) => {
  const ko = await buildModuleObject(spec);
  const zst = await compressModule(ko, 'zst');
  t.same(await decompressModule(zst, 'zst', 1 << 20), ko);
  await agreesWithKmod(t, 'gpu.ko.zst', zst);
});

t.test('.ko.gz (kmod here is built without zlib: compared with the uncompressed object)', async (t) => {
  const ko = await buildModuleObject(spec);
  const gz = await compressModule(ko, 'gz');
  t.same(await readModuleInfo(gz, 'gpu.ko.gz', 1 << 20), parseModinfo(ko));
});

t.test('compressed modules over the size limit are refused before or while decompressing', async (t) => {
  const zeros = Buffer.alloc(4 * 1024 * 1024);
  const xzPath = await ensureDebianBinary('xz', 'xz-utils');
  const file = await writeTemp('zeros', zeros);
  try {
    await run(xzPath, ['--check=crc32', '-f', file.path]);
    const { readFile } = await import('node:fs/promises');
    const xz = await readFile(`${file.path}.xz`);
    t.ok(xz.length < 10_000, 'a small xz file');
    t.equal(xzDecompressedSize(xz), zeros.length);
    await t.rejects(decompressModule(xz, 'xz', 1024 * 1024), { name: 'ModinfoError', message: /decompresses to more than 1 MiB/ });
  } finally {
    await file.cleanup();
  }
  await t.rejects(decompressModule(zlib.zstdCompressSync(zeros), 'zst', 1024 * 1024), { message: /more than 1 MiB/ });
  await t.rejects(decompressModule(zlib.gzipSync(zeros), 'gz', 1024 * 1024), { message: /more than 1 MiB/ });
  await t.rejects(decompressModule(Buffer.from('not xz at all'), 'xz', 1024), ModinfoError);
  await t.rejects(decompressModule(Buffer.from('not gzip'), 'gz', 1024), { name: 'ModinfoError', message: /not a valid gz file/ });
});

t.test('what is not a kernel module is an error, not a crash', async (t) => {
  t.throws(() => parseModinfo(Buffer.from('#!/bin/sh\necho hello\n'.repeat(10))), { message: /not an ELF file/ });
  const noModinfo = buildElf({ bits: 64, endian: 'le', modinfo: [] });
  // rename the section so that there is none called .modinfo
  noModinfo.write('.notinfo', noModinfo.indexOf('.modinfo'));
  t.throws(() => parseModinfo(noModinfo), { message: /no \.modinfo section/ });
  const ko = await buildModuleObject(spec);
  t.throws(() => parseModinfo(ko.subarray(0, 200)), ModinfoError, 'truncated: section headers past the end');
  const bad = Buffer.from(ko);
  bad.writeBigUInt64LE(0xffffffffffffn, 0x28); // e_shoff far away
  t.throws(() => parseModinfo(bad), ModinfoError);
});

t.test('an appended module signature (legacy layout) is reported like modinfo', async (t) => {
  const ko = await buildModuleObject(spec);
  const signed = appendLegacySignature(ko, 'Build time autogenerated kernel key', Buffer.from('0011223344', 'hex'), Buffer.alloc(256, 7));
  const info = parseModinfo(signed);
  t.equal(info.vermagic, VERMAGIC, 'the trailer does not disturb the ELF');
  t.same(info.signature, { sigId: 'X509', sigLength: 256, signer: 'Build time autogenerated kernel key', keyId: '0011223344' });
  const file = await writeTemp('signed.ko', signed);
  try {
    t.equal(await kmodModinfo('signer', file.path), 'Build time autogenerated kernel key');
  } finally {
    await file.cleanup();
  }
  const pkcs7 = Buffer.concat([ko, Buffer.alloc(100, 1), Buffer.from([0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 100]), Buffer.from('~Module signature appended~\n')]);
  t.same(parseModinfo(pkcs7).signature, { sigId: 'PKCS#7', sigLength: 100 });
});

t.test('modules.dep: relative and absolute paths, compressed suffixes, - and _', async (t) => {
  const dep = parseModulesDep(
    [
      'kernel/drivers/gpu/drm/drm.ko.xz:',
      'extra/gpu-drv.ko: kernel/drivers/gpu/drm/drm.ko.xz kernel/drivers/i2c/i2c-core.ko.zst',
      '/lib/modules/6.1.0-18-amd64/updates/old_style.ko: ',
      'garbage line',
      '',
    ].join('\n'),
  );
  t.equal(Object.keys(dep.modules).length, 3);
  t.equal(dep.malformedLines, 1);
  t.same(dep.modules['extra/gpu-drv.ko'], ['kernel/drivers/gpu/drm/drm.ko.xz', 'kernel/drivers/i2c/i2c-core.ko.zst']);
  t.equal(findInModulesDep(dep, 'gpu_drv'), 'extra/gpu-drv.ko', '_ finds -');
  t.equal(findInModulesDep(dep, 'gpu-drv'), 'extra/gpu-drv.ko');
  t.equal(findInModulesDep(dep, 'drm'), 'kernel/drivers/gpu/drm/drm.ko.xz');
  t.equal(findInModulesDep(dep, 'old-style', '/lib/modules/6.1.0-18-amd64'), 'updates/old_style.ko', 'absolute paths made relative');
  t.equal(findInModulesDep(dep, 'gpu'), undefined, 'no prefix matches');
});

t.test('module file names', async (t) => {
  for (const n of ['a.ko', 'x/y/a-b.ko.xz', 'a.ko.zst', 'a.ko.gz']) t.ok(isModuleFileName(n), n);
  for (const n of ['a.ko.bz2', 'a.kox', 'modules.dep', 'a.o', 'x.ko/']) t.notOk(isModuleFileName(n), n);
  t.equal(moduleNameFromPath('extra/gpu-drv.ko.zst'), 'gpu_drv');
});
