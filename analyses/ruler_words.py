"""The fixed word lists of the RULER tasks (`ruler_tasks.py`): keys of the needle tasks are adjective-noun pairs
("succinct-labor"), the common-words task draws its words from all three lists.

RULER samples these from the `wonderwords` package (nounlist.txt, adjectivelist.txt, verblist.txt). residscope ships a
fixed subset instead of depending on it, so prompts never change with a package version: from wonderwords 3.0.1 the
entries of 3-12 lowercase letters a-z that are not on its profanity list, sorted, then every 3rd adjective, every 5th
noun and every 2nd verb. 297 adjectives, 1301 nouns, 516 verbs (2054 distinct words:
enough for the common-words task up to about 32k tokens of a Llama-style tokenizer; longer lengths are refused).

wonderwords is MIT-licensed; its notice:

    MIT License

    Copyright (c) 2020 Maxim Rebguns

    Permission is hereby granted, free of charge, to any person obtaining a copy
    of this software and associated documentation files (the "Software"), to deal
    in the Software without restriction, including without limitation the rights
    to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
    copies of the Software, and to permit persons to whom the Software is
    furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all
    copies or substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
    IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
    FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
    AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
    LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
    SOFTWARE.
"""

ADJECTIVES = tuple("""
aback abashed abiding abnormal abortive abrupt absorbing abundant accessible acoustic adaptable adjoining afraid
agreeable alert alleged ambiguous amused animated anxious aromatic aspiring attractive average axiomatic bashful
belligerent bewildered bitter blue boorish boundless brave breezy broad burly callous capricious ceaseless cheerful
chivalrous clammy clear cloudy cold combative condemned cool cowardly crazy crooked cuddly curly cynical damaged
dangerous dashing deadpan decisive deeply defiant demonic deserted devilish difficult dirty disgusted disturbed
domineering draconian dry dynamic earsplitting eatable efficacious elderly elite empty endurable enthusiastic erect
evanescent excellent exotic exultant faint fallacious fancy fast fearless festive filthy flagrant flat flowery foamy
forgetful frail fresh frightened furtive gabby gaping gentle gifted gleaming glossy goofy grandiose greedy groovy
grubby guarded gusty half handsome happy harsh heavenly helpful high hissing hollow honorable hot humdrum hurried
husky icky ignorant illustrious imminent important incandescent industrious innocent internal itchy jazzy jobless
judicious jumpy kind knowing lacking large lavish learned level likeable lively longing loud loving lucky luxuriant
macabre madly magnificent malicious many mature melodic mere miniature misty moldy muddled murky mysterious narrow
nauseating needy new noiseless nondescript nosy numberless nutty obeisant obsequious obtainable offbeat onerous
orange ossified oval overt painstaking parched pathetic perfect perpetual picayune plain pleasant poised possessive
premium productive proud puffy purple quack questionable quiet rabid rainy rapid ratty receptive redundant
reminiscent resonant righteous ritzy romantic rough ruddy ruthless salty scandalous scattered screeching seemly
shaggy sharp shocking shy silly skinny slippery small smoggy snobbish soggy sordid sparkling spiffy spooky squalid
squeamish standing steady sticky stormy strong subsequent succinct supreme sweltering synonymous tacky tame tangy
tasteless tearful temporary tenuous testy thinkable thoughtless tight tired torpid tranquil trite typical ugly
unadvised unbiased undesirable uninterested unusual upset utopian vacuous vast verdant vigorous volatile wacky
wandering warm watchful wealthy wet wholesale wild wise woebegone wooden worried wretched yellow youthful zealous
""".split())  # sorted

NOUNS = tuple("""
aardvark ability abundance accelerator accident account acetate acoustics act actor addiction admin adrenalin
advancement advice affect afterlife afterthought aggradation agriculture airbag airforce airport albatross ale alias
alley alloy alpaca altar aluminium amber amendment amusement analogy anarchy angel angora anise annual antecedent
anthropology antique anybody ape apparel appetiser applewood apprehension apse archaeology archives ark armoire army
arrogance artichoke ascend ashtray aspic asset associate astrakhan asymmetry atmosphere attacker attention
attraction auditorium auto availability award babe back backpack badge baggage bait balaclava ballet bamboo bandanna
bank banner barbecue barge barn barrier baseboard basin bassinet bathhouse batter bay beam bear beating bedrock beer
beginning beheading belief belly benefit beverage bid bijou billing biopsy birdbath biscuit black blackness blanket
blight block bloodflow blow blush boatyard bolero bond bongo book bookmark booster border boss bottom boundary bow
bowtie boycott brace bran brassiere break breast bribery brief brink brochure bronze brother browsing bubble bud
buffet building bullet bungalow burial burro business butcher buy cabana caboose cafe calculation caliber calorie
campaign can candidate cannon canteen cape capon captor carbohydrate cardigan carload carp carriage cartel cartridge
cash cassava castle catalysis catcher catsup causeway ceiling cell cemetery centimeter ceramic certificate chair
chalet champagne change chaplain charger chart chasuble check cheddar cheetah chemotaxis chestnut chiffonier chill
chino chives cholesterol chopsticks chrome chub chutney cinema circulation citizenship civilisation clan clasp
clause clay cleavage clerk climb cloak cloister closure cloudburst clue coalition cobbler cocoa codling coffee coin
coleslaw collard college colonialism colt combination comfort command commercial common communist compass competitor
complexity component compost computer conception condition conductor conflict congregation connotation conservation
console constitution consulting container continent contractor contributor convenience convertible cooking cop
copyright core cornerstone corporation corruption cot cough counseling counter county court cover cowboy crackers
crane craw cream creativity credenza crepe crewmember cricket crisis criticism crop crowd cruise crust cuckoo
cultivator cupboard curio currency cursor custard cuticle cycle cynic daddy daily dame danger dart date daylight
dealing debris decency declination decrease deed defendant deformation delight demon density dependency depot derby
descent designer destination detainee detention development dew diagram diamond dibble dictionary differential
digestive dilapidation dimple dinosaur dipstick dirndl disarmament disclosure discrepancy disguise disparity
disposer dissonance distributor diversity diving doctor doe doing dolor donkey doorknob dot dough downgrade dozen
dragonfruit drama drawer dress drinking drizzle drum duckling dueling dump duration duty dynamite eaglet earplug
earthworm eaves ecliptic ectoderm edger editorial effective egg eicosanoid electricity elevator elimination elm
embassy emergency emotion employer encirclement end endpoint engine enquiry entity envelope epee episode equal
equity erosion espalier estimate ethics evaluation event evidence exam excellence excitement executive exhibit
exocrine expedition expertise export extension extreme eyebrows eyelids face fact fail faithful familiarity fantasy
farrow father fav fax fedelini feedback felony fender ferryboat fiber ficlet fiesta figure fillet final finer
finisher firewall fisherman fit flair flash fleck flick flock flour fluke flytrap fog follower foodstuffs footnote
footwear ford foreigner forgery format fort forum fourths fragrance fraudster freezer freon friend fringe frontier
frustration full fundraising furry gaffe gallery game gap garlic gasoline gateway gauntlet gearshift gem generation
genius geology geyser gig ginseng git glass gliding glory glut goat godmother goldfish goodbye goose governance
grade graft grand grandmother granola graphic gratitude gray greenhouse grief grit grouse guarantee guest guilder
guitarist gutter gynaecology hacksaw hake hallway hammock handgun handover happiness hardcover hare harmony
harvester hat hatred hawk head headquarters heart heartwood heavy heifer helium help herb heroine hexagon high
hiking hippopotamus hit hog home homogenate honeybee hoof horde horror hosiery hostel hour housewife howard hug
humidity hundred hurdle husband hydraulics hydrolyse hygienic hypothesis icicle ideal ignorance illness imbalance
impact implication impression impulse incense incision incubation indicator inevitable infiltration influence
inglenook inhibition initiative inlay innovation insectarium insomnia instance instruction insurgence integrity
intention interior interval intestine invention investigator invoice ironclad isogloss ivory jade jar jeans jerk
jewelry jodhpurs jot joy juggernaut jumper junker kale kazoo kennel key kid killing kinase kingfish kite knee
knitting koala labor lace ladle lamb land lane lapdog lark last latte lava lawyer leader leaker leave left legging
legume lender leopard lettuce liability licence lie lifetime lightning lilac limit liner linkage lipoprotein list
litigation livestock loading lobotomy lock lode login loneliness loop lot lout luck luncheonette lute lymphocyte
lysine machine madam magic mail main maize makeup mallard mammoth manatee mango manipulation manservant manufacturer
maracas margarine marionberry marketing marriage marxism massage mastoid material matter maybe mean measles meatloaf
medal medium melon memo menorah merchant mesenchyme metabolite meteorology metric microphone midline migration
military millet mime mine minimalism mink minute misnomer missile mister mixture mobility mode modernity mole
monasticism monk monsoon moody moose morning mortality most motivation motorcycle mousse mover muffin murder museum
mussel mutton nail narrative nature necktie neglect neighbour nerve netball neuron newsstand nick nightclub
nightmare nod nonsense normal notebook notoriety nucleotidase numeracy nursery nutrient oar obedience objective
obsession occurrence octavo oeuvre office okra omelet online operation opponent optimal orange orchid oregano
organizing originality other outcome outlay outrage oval overcoat overload overweight oxygen pack paddle pail
paintwork palm panda pansy pants paper parade parameter pardon parka parser particle party passing past pastry
patent pathway patriarch patrolling pause pay peace peanut pedal pelican pencil peninsula peony percentage
performance permafrost person pest petticoat phenomenon philosophy photograph physical piccolo pickle pie pigeon
pilaf pillar pimple pinecone pinstripe pipe pit pith placode plane planter plate platypus playwright plenty plough
plugin plywood podcast point polarization policy polliwog polyp pond popcorn populist porpoise portion possible
posterior pottery pounding practitioner precedent prefix premise present president presume price primary principle
priority privilege probe processing producer professional program prohibition prompt property proposition prospect
protection provider proximity psychologist publication puddle pulse pumpkinseed pup purchase purr put quail quartet
question quill quiver rabbit racism radio rag railroad raincoat raisin ramen ranger rate rations rayon read reality
reason recall recess reclamation recorder rectangle rediscovery referendum refuge regime registry reject relay
relish remnant repair replica reporting reputation research reservoir resist resource restaurant resume retirement
reunion revenue revolution rhinoceros ribbon ridge ring rise river roar robotics role roof rope rotation routine
rubbish ruffle ruler runaway rust sack safeguard sailboat salad salmon salute sanction sandbar sari satire sausage
savior scaffold scam scene schema school scimitar scorn scrambled screen scrip sculptural seagull seaside secrecy
section seed seizure semantics senate sensibility sentencing sequel serum servitude setting sexuality shadowbox
shame shareholder shearling shelf shield ship shirtdress shoelace shoot shore shortwave show shutdown sideboard
siding sign signify silk silver sin sinuosity site skean skin skunk skywalk slave sleep slice slipper slump smock
smuggling snap sniffle snowflake snowsuit soccer sock softdrink sole soliloquy somebody somewhere songbird sorbet
soul source souvenir space spandex spasm speakerphone specialist spectrograph speedboat sphere spike spirit spleen
sponge spork spouse spreadsheet sprout spy squeegee stable stag stake stamina standing start station statute
steamroller stencil stereo stiletto stinger stole stop storey stove strategy street strife strobe stucco stuff sty
subcomponent submitter subset substitution succotash sugar suite summer sundae sunlamp sunshine supervisor support
surfboard surplus survey suspenders swamp sweater swell swing sword symmetry synergy system tablecloth taco tail
tale tambour tank tapioca task tattoo taxpayer teammate technique teenager television temperature temptress tenet
tent term terrace terror testimonial textual theft therapist thesis thinking thorn threshold thrush thunder tiara
tie tilt timeout tin tire toast toenail toilet tomato tonality tool toothpick toreador tortilla tour tower trace
tract tradition trailer trait transcript transmission trapdoor traveler treatment tremor triangle trigonometry
tripod troop trout trunk tsunami tug tummy turban turning turtle tweet twins typeface umbrella underground
undertaker unemployment unique update upward use utilisation vacuum validity van variability vascular vector veil
velodrome venison veranda vernacular vessel veterinarian vibration victory villa vintage violence virus visit
vitality vodka volatility volunteering voyage wage waiter walk wallaby wannabe warfare warning wash wasp watcher
waterfall waterwheel weakness weather website weedkiller weird western wharf whip whisper wholesaler width
wilderness win windshield wingtip wiretap wisteria wok wont woodwind work working worm wound wreck wriggler wrong
yam yawl yesterday yoke youth zebrafish zinc zoo
""".split())  # sorted

VERBS = tuple("""
abide accept achieve acted adapt address admire adopt afford alert allow amuse announce answer apologize applaud
appoint appreciate arbitrate arise arrest ascertain assemble assist attach attain attend audited awake bake ban bare
bathe beam beat beg behave belong beset bid bite bleed blind blot blush boil bomb bore bounce box branch breathe
brief broadcast brush budget bump burst bust buze call care carve catalog cause change chart cheat cheer choke chop
clap classify clear clip clothe coil color come communicate compete complain compose conceive concern conduct
confront connect consider consolidate consult continue control coordinate correct cost counsel cover crash create
critique crush cure curve cycle damage dare decay decide define delegate deliver depend desert design detail
determine devise dig disagree disapprove discover dispense disprove distribute divert double draft drain draw dress
drip drop drum dust earn edited eliminate employ enacted end enforce enhance enlist enter escape estimate examine
excite execute exhibit expand expedite explain express extract facilitate fail fasten fear feel fetch file film
finance fire fix flash fling flood flower fold fool force forego foretell forgive formulate frame frighten gather
generate give glue grab grate greet grind groan guarantee guess hammer handle hang harass hate head heap heat hide
hold hop hover hum hurry hypothesize ignore imagine impress improvise increase influence initiate injure innovate
inspect install instruct integrate intensify interfere interpret interview invent investigate irritate jail jog joke
juggle justify kept kill kneel knock know land laugh lay lean learn lecture lend level lick lifted lighten list live
locate log look love make manage manufacture march market match matter measure mediate melt mend milk mislead
misspell mix model monitor motivate move muddle multiply nail navigate negotiate nod normalize notice obey observe
occur offer open order oriented overcome overdraw overhear overthrow own paddle park participate paste pause peck
peel perceive perform persuade photograph pilot pine pioneer plan play please point polish possess pour praised
preach predict prepare present preset press prevent process produce program project promote propose prove publicize
pump puncture purchase put question quit radiate raise rate read realize receive recommend record reduce reflect
regret rehabilitate reinforce rejoice relax rely remember remove reorganize repeat reply represent request research
respond restructure retrieve review rhyme ride rinse risk rock rot ruin run sack satisfy saw scare schedule scorch
scratch screw scrub search see select send separate service settle shade shape shave shed shine shock shoot show
shrug sigh signal sin sink sit ski slap sleep sling slip slow smell smite sneak sniff snow solve soothsay sound
spare sparkle specify spell spill spit spoil spray spring squash squeal stain stand start steal step stimulate stink
stitch store streamline stretch strike strip stroke study sublet succeed suggest summarize supply suppose surround
suspend sweat swell swing symbolize systemize take tame target teach tease tell terrify thank think throw tick tie
tip touch tow trade transcribe transform transport travel treat trick trot troubleshoot try tumble tutor type
understand undress unify unlock untidy upgrade upset utilize verbalize vex wail wake wander warm wash watch wave
weave weep welcome wet whip whisper win wink wish withhold wobble work wrap wrestle wring yawn zip
""".split())  # sorted
