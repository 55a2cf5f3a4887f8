import t from 'tap';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { ModinfoError } from '../../src/engine/modinfo.ts';
import { createModuleSigner, ModuleSignatureError, signModuleFile, verifyModuleFile, type ModuleSigner } from '../../src/sign/module-signature.ts';
import { ensureDebianBinary } from '../helpers/debian.ts';
import { buildModuleObject, compressModule, kmodModinfo, writeTemp, type ModuleCompression } from '../helpers/kmod-fixtures.ts';
import { ensureSignFile, makeSigningKey, signWithSignFile, type SigningKeyFiles } from '../helpers/sign-file.ts';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const VERMAGIC = '6.1.0-18-amd64 SMP preempt mod_unload modversions ';
const NAME = 'kmm_ci_file';
const limits = { maxBytes: 64 * MiB };

let module: Buffer;
let keys: SigningKeyFiles;
let other: SigningKeyFiles;
let signer: ModuleSigner;
/** Debian sign-file's output for `module` with `keys`, sha256. */
let expected: Buffer;

t.before(async () => {
  await ensureSignFile();
  await ensureDebianBinary('modinfo', 'kmod');
  module = await buildModuleObject({ name: NAME, vermagic: VERMAGIC, depends: [], extra: { license: 'GPL' } });
  [keys, other] = await Promise.all([
    makeSigningKey({ type: 'rsa', bits: 2048 }, 'module file signer'),
    makeSigningKey({ type: 'rsa', bits: 2048 }, 'another signer'),
  ]);
  signer = createModuleSigner(keys.key, keys.certDer);
  expected = await signWithSignFile(module, { hash: 'sha256', keyPath: keys.keyPath, certPath: keys.certDerPath });
});

t.teardown(async () => {
  await Promise.all([keys?.cleanup(), other?.cleanup()]);
});

const TOOLS: Record<ModuleCompression, { binary: string; pkg: string; magic: Buffer }> = {
  xz: { binary: 'xz', pkg: 'xz-utils', magic: Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) },
  zst: { binary: 'zstd', pkg: 'zstd', magic: Buffer.from([0x28, 0xb5, 0x2f, 0xfd]) },
  gz: { binary: 'gzip', pkg: 'gzip', magic: Buffer.from([0x1f, 0x8b]) },
};

/** The file decompressed by the format's own tool (`xz -dc`, `zstd -dc`, `gzip -dc`), which also checks its integrity. */
async function toolDecompress(compression: ModuleCompression, data: Buffer): Promise<Buffer> {
  const tool = await ensureDebianBinary(TOOLS[compression].binary, TOOLS[compression].pkg);
  const file = await writeTemp(`${NAME}.ko.${compression}`, data);
  try {
    const { stdout } = await run(tool, ['-dc', file.path], { encoding: 'buffer', maxBuffer: 64 * MiB });
    return stdout;
  } finally {
    await file.cleanup();
  }
}

/** kmod 30 on Debian is built with XZ and ZSTD but without ZLIB: it cannot read .ko.gz. */
async function kmodReads(compression: ModuleCompression): Promise<boolean> {
  if (compression === 'gz') return false;
  const modinfo = await ensureDebianBinary('modinfo', 'kmod');
  const { stdout } = await run(modinfo, ['--version']);
  return stdout.includes(`+${compression === 'xz' ? 'XZ' : 'ZSTD'}`);
}

t.test('an uncompressed .ko: the same bytes as sign-file', async (t) => {
  t.ok((await signModuleFile(module, `${NAME}.ko`, signer, limits)).equals(expected));
  t.same(await verifyModuleFile(expected, `${NAME}.ko`, keys.certPem, limits), { signer: signer.signer, keyId: signer.keyId, hashAlgorithm: 'sha256' });
});

for (const compression of ['xz', 'zst', 'gz'] as const) {
  const fileName = `${NAME}.ko.${compression}`;
  t.test(`a .ko.${compression}: decompressed, signed as sign-file signs, compressed again in the same format`, async (t) => {
    const packed = await compressModule(module, compression);
    const signed = await signModuleFile(packed, fileName, signer, limits);
    t.ok(signed.subarray(0, TOOLS[compression].magic.length).equals(TOOLS[compression].magic), `${compression} by its magic bytes`);
    t.ok((await toolDecompress(compression, signed)).equals(expected), `${TOOLS[compression].binary} -d gives exactly sign-file's output for the decompressed module`);
    if (compression === 'xz') {
      const xz = await ensureDebianBinary('xz', 'xz-utils');
      const file = await writeTemp(fileName, signed);
      try {
        const { stdout } = await run(xz, ['-lvv', '--robot', file.path]);
        t.match(stdout, /\tCRC32\t/, 'xz: CRC32 check');
        t.match(stdout, /--lzma2=dict=1MiB/, 'xz: 1 MiB dictionary');
      } finally {
        await file.cleanup();
      }
    }
    if (await kmodReads(compression)) {
      const file = await writeTemp(fileName, signed);
      try {
        t.equal(await kmodModinfo('signer', file.path), signer.signer, `modinfo reads the .ko.${compression}: signer`);
        t.equal(await kmodModinfo('sig_key', file.path), signer.keyId, 'sig_key');
        t.equal(await kmodModinfo('sig_hashalgo', file.path), 'sha256', 'sig_hashalgo');
        t.equal(await kmodModinfo('name', file.path), NAME, 'name');
      } finally {
        await file.cleanup();
      }
    } else {
      t.comment(`kmod here cannot read .ko.${compression}: compared after decompressing only`);
    }
    t.same(await verifyModuleFile(signed, fileName, keys.certDer, limits), { signer: signer.signer, keyId: signer.keyId, hashAlgorithm: 'sha256' });
    const resigned = await signModuleFile(signed, fileName, signer, limits);
    t.ok((await toolDecompress(compression, resigned)).equals(expected), 're-signing the signed file: still one signature');
    const bySignFile = await compressModule(await signWithSignFile(module, { hash: 'sha512', keyPath: other.keyPath, certPath: other.certDerPath }), compression);
    t.ok((await toolDecompress(compression, await signModuleFile(bySignFile, fileName, signer, limits))).equals(expected), 'a file signed with another key: re-signed');
    await t.rejects(verifyModuleFile(bySignFile, fileName, keys.certDer, limits), { code: 'WrongSigner' });
  });
}

t.test('refusals', async (t) => {
  const packed = await compressModule(module, 'zst');
  await t.rejects(signModuleFile(packed, `${NAME}.ko.zst`, signer, { maxBytes: 100 }), ModinfoError, 'over maxBytes');
  await t.rejects(signModuleFile(packed, `${NAME}.ko.xz`, signer, limits), ModinfoError, 'content that is not what its name says');
  await t.rejects(signModuleFile(module, `${NAME}.txt`, signer, limits), { name: 'ModinfoError', message: /not a kernel module file name/ });
  await t.rejects(verifyModuleFile(packed, `${NAME}.ko.zst`, keys.certDer, limits), ModuleSignatureError, 'an unsigned file');
  await t.rejects(signModuleFile(packed, `${NAME}.ko.zst`, signer, { ...limits, signal: AbortSignal.abort() }), { name: 'AbortError' });
});
