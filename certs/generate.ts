/**
 * Generates the development PKI for the stand-alone server (see certs/README.md).
 *
 *   node certs/generate.ts [--dir certs] [--server https://127.0.0.1:8443] [--san NAME]... [--days N] [--force]
 *
 * Exit codes: 0 on success, 1 when writing fails, 2 on bad usage.
 */

import { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { relative } from 'node:path';
import { parseArgs } from 'node:util';
import type { DevPkiOptions, DevPkiPaths } from '../src/certs/dev-pki.ts';
import { checkDevPkiOptions, ensureDevPki, generateDevPki } from '../src/certs/dev-pki.ts';

const USAGE = `Usage: node certs/generate.ts [options]

Creates a development CA, a serving certificate, an admin client certificate
(CN kmm-preflight-admin, O system:masters) and a kubeconfig for the stand-alone
kmm-preflight server. Existing files are kept unless --force is given; the
kubeconfig alone is rewritten when --server changes.

Options:
  --dir DIR       output directory (default: certs, relative to the current directory)
  --server URL    server URL written into the kubeconfig (default: https://127.0.0.1:8443)
  --san NAME      extra subject alternative name of the serving certificate, DNS name
                  or IP address; repeatable
  --days N        validity of the certificates in days (default: 365)
  --force         regenerate everything, replacing an existing CA
  -h, --help      show this help

These are development credentials: never use them in production.
`;

class UsageError extends Error {}

function parse(argv: string[]): { help: boolean; force: boolean; options: DevPkiOptions } {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        dir: { type: 'string', default: 'certs' },
        server: { type: 'string', default: 'https://127.0.0.1:8443' },
        san: { type: 'string', multiple: true, default: [] },
        days: { type: 'string' },
        force: { type: 'boolean', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (error) {
    throw new UsageError(parseArgsMessage(error));
  }
  let days: number | undefined;
  if (values.days !== undefined) {
    days = Number(values.days);
    if (!/^\d+$/.test(values.days) || days <= 0) {
      throw new UsageError(`--days must be a positive whole number, got ${JSON.stringify(values.days)}`);
    }
  }
  if (values.dir.trim() === '') throw new UsageError('--dir must not be empty');
  const options: DevPkiOptions = { dir: values.dir, serverUrl: values.server, extraSans: values.san, days };
  return { help: values.help, force: values.force, options };
}

/** parseArgs messages run to several sentences of advice; one sentence suits a usage error. */
function parseArgsMessage(error: unknown): string {
  const { code, message } = error as { code?: string; message: string };
  const option = /'([^']+)'/.exec(message)?.[1];
  switch (code) {
    case 'ERR_PARSE_ARGS_UNKNOWN_OPTION':
      return `unknown option ${option ?? ''}`.trim();
    case 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL':
      return `unexpected argument ${option ?? ''}`.trim();
    case 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE':
      return (message.split('. ')[0] ?? message).replace(/\.$/, '');
    default:
      return message;
  }
}

/** Lists requested SANs the kept serving certificate lacks, since ensureDevPki does not reissue for them. */
async function missingSans(paths: DevPkiPaths, sans: readonly string[]): Promise<string[]> {
  const cert = new X509Certificate(await readFile(paths.serverCert));
  return sans.filter((san) => (isIP(san) ? cert.checkIP(san) === undefined : cert.checkHost(san) === undefined));
}

async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parse(argv);
    if (parsed.help) {
      process.stdout.write(USAGE);
      return 0;
    }
    checkDevPkiOptions(parsed.options);
  } catch (error) {
    process.stderr.write(`generate: ${(error as Error).message}; see --help.\n`);
    return 2;
  }
  const { force, options } = parsed;

  const started = performance.now();
  let paths: DevPkiPaths;
  let action: string;
  if (force) {
    paths = await generateDevPki(options);
    action = 'generated a new development PKI';
  } else {
    const result = await ensureDevPki(options);
    paths = result.paths;
    if (result.created) {
      action = `generated a new development PKI (${result.reason ?? 'none existed'})`;
    } else if (result.kubeconfigUpdated) {
      action = `kept the existing PKI and rewrote the kubeconfig for ${options.serverUrl}`;
    } else {
      action = 'kept the existing PKI; nothing to do';
    }
    const missing = result.created ? [] : await missingSans(paths, options.extraSans ?? []);
    if (missing.length > 0) {
      process.stderr.write(
        `generate: warning: the existing serving certificate lacks ${missing.join(', ')}; rerun with --force to reissue it.\n`,
      );
    }
  }
  const elapsed = Math.round(performance.now() - started);

  const show = (path: string): string => relative(process.cwd(), path) || path;
  const files: [string, string][] = [
    [paths.caCert, 'development CA certificate'],
    [paths.caKey, 'development CA key (0600)'],
    [paths.serverCert, 'serving certificate'],
    [paths.serverKey, 'serving key (0600)'],
    [paths.adminCert, 'client certificate kmm-preflight-admin, group system:masters'],
    [paths.adminKey, 'client key (0600)'],
    [paths.kubeconfig, `kubeconfig for ${options.serverUrl} (0600)`],
  ];
  const width = Math.max(...files.map(([path]) => show(path).length));
  process.stdout.write(
    [
      `${action} (${elapsed} ms):`,
      ...files.map(([path, what]) => `  ${show(path).padEnd(width)}  ${what}`),
      '',
      `Try: kubectl --kubeconfig ${show(paths.kubeconfig)} api-resources`,
      '',
    ].join('\n'),
  );
  return 0;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (error) {
  process.stderr.write(`generate: ${(error as Error).message}\n`);
  process.exitCode = 1;
}
