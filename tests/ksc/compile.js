#!/usr/bin/env node
// Compile Kaitai Struct specs to Python with the official JavaScript build of
// kaitai-struct-compiler (pinned in tests/ksc/package.json).
//
// Usage: node compile.js OUTDIR FILE.ksy [FILE.ksy ...]
//
// Every spec is compiled to Python and each produced file is written into
// OUTDIR (the compiler also emits one module per spec pulled in through
// `meta/imports`, so OUTDIR holds every module the generated code imports).
// The names of the written files are printed one per line.  On any error the
// message (for compiler errors it names the offending spec path, e.g.
// `/types/header/seq/3`) is printed to stderr and the exit status is 1; OUTDIR
// is only written to when every spec compiled.
//
// Environment:
//   DISKSPEC_KSC_DIR          node_modules folder holding the compiler and js-yaml
//                             (default: <repo>/.ksc/node_modules)
//   DISKSPEC_KSC_IMPORT_PATH  extra folders (path.delimiter separated) searched for
//                             absolute imports (`imports: [foo/bar]`); the folder of
//                             the top-level spec is always searched last.
"use strict";

const fs = require("fs");
const path = require("path");

const EXPECTED_VERSION = "0.11.0";
const REPO_ROOT = path.resolve(__dirname, "..", "..");

function fail(message) {
  process.stderr.write(message.endsWith("\n") ? message : message + "\n");
  process.exit(1);
}

function loadModule(modulesDir, name) {
  // Resolve strictly inside modulesDir: no fallback to a global installation.
  const base = path.dirname(modulesDir);
  let resolved;
  try {
    resolved = require.resolve(name, { paths: [base] });
  } catch (err) {
    fail(`cannot find module '${name}' in ${modulesDir} (run npm ci there): ${err.message}`);
  }
  const rel = path.relative(modulesDir, resolved);
  if (rel.startsWith("..") || path.isAbsolute(rel)) {
    fail(`module '${name}' resolved outside ${modulesDir}: ${resolved}`);
  }
  return require(resolved);
}

const modulesDir = path.resolve(
  process.env.DISKSPEC_KSC_DIR || path.join(REPO_ROOT, ".ksc", "node_modules"),
);
const compiler = loadModule(modulesDir, "kaitai-struct-compiler");
const yaml = loadModule(modulesDir, "js-yaml");

if (compiler.version !== EXPECTED_VERSION) {
  fail(`kaitai-struct-compiler ${EXPECTED_VERSION} expected, found ${compiler.version}`);
}

// js-yaml implements YAML 1.2 and turns every integer into a JS double, so an
// integer literal beyond 2**53 (enum keys, `value: 0xffff_0000_0000_0000`, ...)
// would silently lose precision.  Keep such literals as their source text
// instead: the compiler parses strings as expressions, and the expression
// language reads all of Kaitai's integer forms exactly.
const builtinInt = yaml.types.int;
const exactInt = new yaml.Type("tag:yaml.org,2002:int", {
  kind: "scalar",
  resolve: builtinInt.resolve,
  construct(data) {
    const value = builtinInt.construct(data);
    return Number.isSafeInteger(value) ? value : data.replace(/^\+/, "");
  },
  predicate: builtinInt.predicate,
  represent: builtinInt.represent,
  defaultStyle: builtinInt.defaultStyle,
});
const SCHEMA = yaml.DEFAULT_SCHEMA.extend({ implicit: [exactInt] });

function readKsy(file) {
  let text;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new Error(`cannot read ${file}: ${err.message}`);
  }
  try {
    return yaml.load(text, { filename: file, schema: SCHEMA });
  } catch (err) {
    throw new Error(`YAML error in ${file}: ${err.message}`);
  }
}

function importSearchPath(topDir) {
  const extra = (process.env.DISKSPEC_KSC_IMPORT_PATH || "")
    .split(path.delimiter)
    .filter((p) => p !== "")
    .map((p) => path.resolve(p));
  return [...extra, topDir];
}

// The compiler itself joins a relative import with the folder of the spec that
// contains it, and hands the importer a path relative to the folder of the
// top-level spec (mode "rel"), or the bare name of an absolute import (mode "abs").
function makeImporter(topFile) {
  const topDir = path.dirname(topFile);
  return {
    importYaml(name, mode) {
      try {
        let candidates;
        if (mode === "abs") {
          candidates = importSearchPath(topDir).map((dir) => path.join(dir, name + ".ksy"));
        } else {
          candidates = [path.resolve(topDir, name + ".ksy")];
        }
        const found = candidates.find((p) => fs.existsSync(p));
        if (found === undefined) {
          throw new Error(
            `import '${name}' (${mode}) from ${topFile} not found; tried: ${candidates.join(", ")}`,
          );
        }
        return Promise.resolve(readKsy(found));
      } catch (err) {
        return Promise.reject(err);
      }
    },
  };
}

function errorText(err) {
  if (err && typeof err.message === "string" && err.message !== "") {
    return err.message;
  }
  return String(err);
}

function writeOutput(outDir, name, source) {
  const target = path.resolve(outDir, name);
  const rel = path.relative(outDir, target);
  if (rel.startsWith("..") || path.isAbsolute(rel)) {
    throw new Error(`compiler produced a file outside OUTDIR: ${name}`);
  }
  fs.mkdirSync(path.dirname(target), { recursive: true });
  fs.writeFileSync(target, source);
  return target;
}

// Compiling two specs that share an import emits that module twice; the copies may
// differ in the order of their `import` lines only.
function sameModule(a, b) {
  const norm = (src) => src.split("\n").sort().join("\n");
  return a === b || norm(a) === norm(b);
}

async function main(argv) {
  if (argv.length < 2) {
    fail("usage: node compile.js OUTDIR FILE.ksy [FILE.ksy ...]");
  }
  const outDir = path.resolve(argv[0]);
  const compiled = [];
  for (const arg of argv.slice(1)) {
    const file = path.resolve(arg);
    let files;
    try {
      const ksy = readKsy(file);
      files = await compiler.compile("python", ksy, makeImporter(file), false);
    } catch (err) {
      fail(`${arg}: ${errorText(err)}`);
    }
    compiled.push({ file, files });
  }
  // Write only once everything compiled, so a failure leaves OUTDIR untouched.
  const written = new Map();
  for (const { file, files } of compiled) {
    for (const [name, source] of Object.entries(files)) {
      const previous = written.get(name);
      if (previous !== undefined) {
        if (!sameModule(previous.source, source)) {
          fail(`${name} is produced differently by ${previous.file} and ${file}`);
        }
        continue;
      }
      written.set(name, { source, file });
    }
  }
  fs.mkdirSync(outDir, { recursive: true });
  for (const [name, { source }] of written) {
    writeOutput(outDir, name, source);
    process.stdout.write(name + "\n");
  }
}

main(process.argv.slice(2)).catch((err) => fail(errorText(err)));
